"""The call's state: its record (`record`), who makes it (`who`) and what its admission holds
(`admission`). Plain values that import none of the gateway's layers, so that every layer can import
them."""
