"""ipcctl's lean path: ``submit``, ``submit --wait`` and ``result`` in their common forms,
started with almost nothing imported, on a compiled copy of the configuration
(ipcd.lean.cache); every other command line goes to the full CLI (ipcd.cli.ipcctl).

Kept empty of imports: ``import ipcd.lean.ipcctl`` runs this file first.
"""
