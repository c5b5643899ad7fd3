"""`kiln cost`: what one image costs on your own GPU, measured, against Replicate's price.

`sources` reads the measurement (a server's /metrics or a load benchmark's results),
`prices` holds Replicate's published per-second hardware prices, `report` does the
arithmetic, `render` prints it, `plot` draws it, and `cli` is the subcommand.
"""
