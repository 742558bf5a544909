"""`keyreid-watch`: cameras in, tracklets, clip descriptors and identities in storage out.

`config` (cams.yaml), `worker` (one process per camera: decode, detect, track, cut clips),
`encoder_service` (batched re-id encoding in the main process), `watch` (supervision, the
ordered storage spool and identity linking), `demo` (`keyreid-fetch-demo`)."""
