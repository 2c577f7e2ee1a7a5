"""Dock widgets of the napari face (npe2 ``widgets`` contributions).

Each widget is a magicgui ``Container`` built with the viewer; long work runs in a napari
thread worker (:class:`._common.JobRunner`) with a progress bar and a Stop button, and layers
are added or updated only from the main thread.  torch is imported only when a job runs.
"""
