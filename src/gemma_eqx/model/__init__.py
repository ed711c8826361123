"""The model as small Equinox modules (`modules`, on the treescope-aware `base.Module`), its
activation sites (`sites`) and their rendering (`display`), the parameter schema (`params`:
every leaf, its logical axes and its name in each format), models as `{path: array}`
(`weights`), the scanned layer stack (`scanned`) and generation with a KV cache
(`generate`). Imports `core` only."""
