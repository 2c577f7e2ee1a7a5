"""napari-cdinn: real-time coherent diffraction imaging (CDI NN) in napari.

The core (:mod:`.physics`, :mod:`.simulate`, :mod:`.retrieval`, :mod:`.nn`, :mod:`.io`) imports
neither Qt nor napari; torch is imported lazily, where it is used.
"""

__version__ = "0.1.0"
