"""Feature flow across layers (source document 003, Laptev et al.): SAE features matched by the
cosine of their decoder rows, flow graphs, predecessor groups, deactivation and multi-layer
steering. `featopt flow match|graph|groups|deactivate|steer|transition` on the command line.
"""
