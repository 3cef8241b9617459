"""The GPU: NVML and process readers, the memory guard, and neighbours sharing a GPU."""
