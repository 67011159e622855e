"""The proxy core: the upstream client and its retry policy, reading request bodies, and relaying the
upstream's answer to the client, whole or as server-sent events, while noticing a client that leaves."""
