"""The data plane's workers: gRPC services around the engine (target) and the drafters (draft), the
drafter that calls a draft worker, proto conversions, and the drain both workers share."""
