"""Layout planner: per-GPU memory and step-time model of InternVL layouts, and the search."""
