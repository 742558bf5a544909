"""KeyRe-ID Watch applications: the `keyreid-watch` service and the Streamlit dashboard."""
