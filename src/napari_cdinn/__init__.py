"""napari-cdinn: real-time coherent diffraction imaging (CDI NN) in napari.

The core (:mod:`.physics`, :mod:`.simulate`, :mod:`.retrieval`, :mod:`.nn`, :mod:`.io`) imports
neither Qt nor napari; torch is imported lazily, where it is used.  The napari face (reader,
writer, sample data, layer conventions, dock widgets) lives in :mod:`._napari`.
"""

__version__ = "0.1.0"
