"""The model library: which configured models are resident on the device.

- `residency`: keeps the models that fit the memory budget resident, loads the others on
  first use on a loader thread, and unloads the least recently used idle ones for room.
- `budget`: which resident models to unload so that another fits.
- `memory`: how many bytes a loaded model holds.
- `state`: each model's state, as the engine core reports it.
- `admin`: ListModelStates, LoadModel and UnloadModel of ModelAdminService (API process).
"""
