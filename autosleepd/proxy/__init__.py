"""The data path: classify each request, hold it or forward it, stream bodies both ways."""
