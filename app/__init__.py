"""KeyRe-ID Watch application, in the order data flows: `app.watcher` (the `keyreid-watch`
service: config, camera workers, encoder service, storing and linking), then `app.dashboard`
(the Streamlit dashboard that searches what the watcher stored). The modules here are tools
around both: `bench` (pipeline speed), `bench_linking` (the linker at scale), `soak` (a long
real-time run) and `evaluate` (a database scored against ground truth)."""
