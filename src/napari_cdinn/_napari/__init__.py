"""The napari face: reader, writer, sample data, layer conventions and dock widgets.

Everything that imports napari or Qt lives in this subpackage; it only adapts layers to calls
of the core (the rest of :mod:`napari_cdinn`), which imports neither.
"""
