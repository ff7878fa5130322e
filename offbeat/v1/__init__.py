"""Generated protobuf bindings for the offbeat.v1 contracts (see proto/; `make proto`)."""
