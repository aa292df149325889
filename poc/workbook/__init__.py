"""The workbook: load client, runner, experiments, benchmark, soak, charts, reports, fault proxy, test PKI.

It depends on the product (`poc.tunnel`, `poc.transports`, `poc.gateway`, `poc.connector`, `poc.direct`, ...),
never the other way round; `pip install '.[workbook]'` brings what it needs (polars, altair, papermill, ...).
"""
