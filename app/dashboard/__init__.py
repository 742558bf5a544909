"""`keyreid-dashboard`: search a person across cameras in what the watcher stored.

`cli` starts Streamlit on `ui` (the pages); `data` is the page-independent logic (reads through
a read-only repository, the few operator writes), `upload` turns a photo or video into a query."""
