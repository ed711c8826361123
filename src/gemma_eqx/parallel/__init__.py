"""Models over device meshes: sharding rules from the schema's logical axes (`sharding`) and
throughput measurement and planning (`throughput`). Imports `core` and `model`."""
