"""KeyRe-ID Watch application: the `keyreid-watch` service (config, workers, encoder service,
identity linking), the demo fetcher and the benchmark. The dashboard lives in `app.dashboard*`."""
