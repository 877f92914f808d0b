"""What the target and draft worker deployments share: a gRPC server and a membership in Redis,
checked by Serve's health probe and torn down together."""
from __future__ import annotations


class GrpcWorker:
    membership = None   # cluster.heartbeat.Membership
    server = None       # grpc.Server

    def check_health(self) -> None:
        """Serve calls this periodically: a worker whose heartbeat stopped is replaced."""
        self.membership.check()

    def __del__(self):
        try:
            if self.membership is not None:
                self.membership.stop()
            if self.server is not None:
                self.server.stop(grace=None)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
