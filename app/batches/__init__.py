"""The Batch API's jobs, metered once they end: a background job beside the request path, reading the
upstream's batches and files and writing their usage through the recorder's writer."""
