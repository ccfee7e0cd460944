"""The divisive tree and IPC selection exactly as they were before the host-sync reduction (kmeans.py,
clustering.py and selection.py of ``ops``, imports made relative, otherwise unchanged).

tests/test_host_syncs.py runs these beside ``ops`` on the same data and requires identical bytes, so a later
change that alters a tree on either code path (numpy, or the GPU path through tests/counting_cupy.py) fails
there. Not used by the package.
"""
