"""gpuq's core: settings, models, states, the operations layer, client and CLI."""
