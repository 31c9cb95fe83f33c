"""Generated gRPC/protobuf stubs of proto/icecache/v1 (do not edit; run
python/tools/gen_stubs.py after changing proto/)."""
