"""The edge of the data path: what every request meets first, before anyone knows who sends it — the
path made canonical, the head of the request bounded, and the call record put on the request."""
