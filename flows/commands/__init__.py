"""The implementations of ``voxelflow``'s commands, by what they work on; ``flows/cli.py``
holds the parser that names them."""
