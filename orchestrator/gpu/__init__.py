"""The GPU memory budget: the inventory (NVML or declared) and the plan that places workers."""
