"""Pure tensor functions: no nn.Module, no global state. Shapes are given in each docstring."""
