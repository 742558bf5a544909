"""KeyRe-ID Watch dashboard (Streamlit): where else was this person seen, and when?

Start it with `keyreid-dashboard --db URL`; it reads the database the watcher writes through a
read-only storage repository (it never blocks the watcher). Merging identities, splitting a
tracklet out, and confirming or rejecting a candidate link are the only writes, each one short
storage transaction that the running watcher then follows.

Pages: Overview (with the model-separation gauge), Search by tracklet, Search by upload,
Identities (each one's journey across cameras), Unlinked tracklets (the ones the linker was not
sure about, with their best candidates). The URL carries the page and the selection
(`?page=tracklet&tracklet=12`, `?page=identity&identity=3`, `?page=unlinked`), so a view can be
bookmarked or shared.
"""
from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import altair as alt
import numpy as np
import streamlit as st

from app.dashboard.data import (
    AnnotatedHit,
    Candidate,
    DashboardError,
    DashboardSettings,
    EncoderChoice,
    activity_points,
    camera_rows,
    candidate_identities,
    choose_encoder,
    confirm_link,
    format_duration,
    format_time,
    is_wall_clock,
    journey,
    merge_identities,
    open_readonly,
    reject_link,
    search_by_descriptor,
    search_by_tracklet,
    split_tracklet,
    time_bounds,
    transit_words,
    unlinked_reason,
)
from app.dashboard.upload import ClipPolicy, UploadedFile, UploadError, build_query_clip
from storage import GalleryIndex, Repository, StorageError, TrackletRecord
from storage.similarity import similarity_percent

PAGES = {
    "overview": "Overview",
    "tracklet": "Search by tracklet",
    "upload": "Search by upload",
    "identity": "Identities",
    "unlinked": "Unlinked tracklets",
}
GRID_COLUMNS = 6
GRID_PAGE_SIZE = 24
IDENTITY_PAGE_SIZE = 50
JOURNEY_PAGE_SIZE = 20
UNLINKED_PAGE_SIZE = 10
CANDIDATES = 3  # candidate identities shown per unlinked tracklet
POSE_IMGSZ = 1280
THUMBNAIL_WIDTH = 120
SMALL_THUMBNAIL_WIDTH = 60  # journey and candidate rows: many per screen


# -- cached resources (shared by every browser session of this server) -----------------------
@st.cache_resource(show_spinner=False)
def repository(url: str) -> Repository:
    return open_readonly(url)


@st.cache_resource(max_entries=2, show_spinner="Loading stored descriptors…")
def gallery(_repo: Repository, url: str, model_id: str | None, clips: int) -> GalleryIndex:
    """The in-memory gallery of one model; rebuilt when the number of stored clips changes."""
    return _repo.gallery_index(model_id)


@st.cache_resource(show_spinner="Loading the re-id encoder…")
def encoder(checkpoint: str | None, model: str, overrides: str, device: str | None):
    from reid import Encoder

    return Encoder(checkpoint=checkpoint, model=model, device=device, **json.loads(overrides))


@st.cache_resource(show_spinner="Loading the person detector…")
def person_tracker():
    """YOLO-pose for uploads, with a lock: one upload uses its tracker state at a time."""
    from tracking import PoseTracker, find_pose_weights

    return PoseTracker(find_pose_weights(), imgsz=POSE_IMGSZ), threading.Lock()


# -- helpers ---------------------------------------------------------------------------------
def int_param(name: str) -> int | None:
    value = st.query_params.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def init_state() -> None:
    """Seed the widgets from the URL once per browser session."""
    if st.session_state.get("initialised"):
        return
    st.session_state["initialised"] = True
    page = st.query_params.get("page", "overview")
    st.session_state["page"] = page if page in PAGES else "overview"
    st.session_state["query_tracklet"] = int_param("tracklet")
    st.session_state["identity"] = int_param("identity")


def select_tracklet(tracklet_id: int) -> None:
    st.session_state["query_tracklet"] = tracklet_id


def flash(message: str) -> None:
    """Show `message` after a rerun (the page above it must redraw from the changed database)."""
    st.session_state["flash"] = message
    st.rerun()


def show_image(data: bytes | None, caption: str, width: int | str = THUMBNAIL_WIDTH) -> None:
    """A thumbnail; `width="stretch"` fills a narrow column instead of overflowing it."""
    if data:
        st.image(data, caption=caption, width=width)
    else:
        st.caption(f"(no thumbnail) {caption}")


def camera_label(camera_id: str, names: dict[str, str]) -> str:
    name = names.get(camera_id, camera_id)
    return name if name == camera_id else f"{name} ({camera_id})"


def pager(label: str, total: int, page_size: int, key: str) -> int:
    """A page number input; returns the row offset."""
    pages = max(1, -(-total // page_size))
    page = st.number_input(f"{label} page (of {pages})", min_value=1, max_value=pages, value=1,
                           step=1, key=key)
    return (int(page) - 1) * page_size


def result_controls(index: GalleryIndex, key: str) -> tuple[int, float | None]:
    """The result-count slider and the similarity cut-off slider (0% means "no cut-off"), on the
    one scale operators see everywhere (`storage.similarity`)."""
    left, right = st.columns(2)
    k = left.slider("Results", min_value=1, max_value=50, value=10, key=f"{key}_k")
    least = right.slider("Minimum similarity (%)", min_value=0, max_value=100, value=0,
                         key=f"{key}_cut",
                         help="Hide matches less similar than this (cosine similarity of the "
                              "tracklet descriptors). At 0 nothing is hidden.")
    return k, None if least <= 0 else float(np.sqrt(2.0 - 2.0 * least / 100.0))


def show_results(results: list[AnnotatedHit], cameras: dict[str, str]) -> None:
    if not results:
        st.info("No match within the filters and the similarity cut-off.")
        return
    st.subheader(f"{len(results)} match{'es' if len(results) != 1 else ''}")
    for start in range(0, len(results), GRID_COLUMNS):
        for column, item in zip(st.columns(GRID_COLUMNS), results[start:start + GRID_COLUMNS]):
            hit = item.hit
            with column:
                thumb = item.tracklet.thumbnail if item.tracklet else None
                show_image(thumb, f"#{hit.rank} · {cameras.get(hit.camera_id, hit.camera_id)}",
                           width="stretch")
                identity = item.tracklet.identity_id if item.tracklet else hit.identity_id
                st.markdown(
                    f"**{similarity_percent(hit.distance):.0f}% similar**  \n"
                    f"{format_time(hit.first_time)} – {format_time(hit.last_time)}  \n"
                    f"tracklet {hit.tracklet_id} · identity {identity if identity else '–'}"
                    + ("  \n:green[**same identity**]" if item.same_identity else ""))
    st.dataframe([{
        "rank": r.hit.rank, "similarity": f"{similarity_percent(r.hit.distance):.0f}%",
        "distance": round(r.hit.distance, 4), "camera": r.hit.camera_id,
        "from": format_time(r.hit.first_time), "to": format_time(r.hit.last_time),
        "tracklet": r.hit.tracklet_id,
        "identity": r.tracklet.identity_id if r.tracklet else r.hit.identity_id,
        "same identity": r.same_identity,
    } for r in results], hide_index=True, width="stretch")


# -- pages -----------------------------------------------------------------------------------
def overview_page(repo: Repository, index: GalleryIndex | None, cameras, filters) -> None:
    st.header("Overview")
    stats = repo.stats()
    columns = st.columns(5)
    for column, (label, value) in zip(columns, [
            ("Cameras", stats.cameras), ("Tracklets", stats.tracklets), ("Clips", stats.clips),
            ("Identities", stats.identities), ("Watcher runs", stats.runs)]):
        column.metric(label, f"{value:,}")
    if not cameras:
        st.info("No camera has been recorded yet. Start `keyreid-watch --cameras cams.yaml` "
                "on this database; this page fills in as it runs.")
        return
    runs = repo.list_runs()
    if runs:
        last = runs[-1]
        st.caption(f"Latest watcher run {last.id}: {last.status}, started "
                   f"{last.started_at:%Y-%m-%d %H:%M:%S} UTC on {last.hostname or '?'}")
    show_separation(runs[-1].calibration if runs else None)
    st.subheader("Cameras")
    shown = [c for c in cameras if c.id in filters["cameras"]]
    st.dataframe(camera_rows(repo, shown, index), hide_index=True, width="stretch")
    st.subheader("Activity")
    bucket = st.select_slider("Bucket", options=[1, 5, 10, 30, 60, 300, 600, 3600], value=10,
                              format_func=lambda s: f"{s} s", key="bucket")
    points = activity_points(repo, shown, float(bucket))
    if not points:
        st.info("No tracklets recorded yet.")
        return
    if is_wall_clock(points[0]["time (s)"]):  # Vega-Lite reads temporal values as epoch ms
        points = [{**p, "time (s)": p["time (s)"] * 1000.0, "end (s)": p["end (s)"] * 1000.0}
                  for p in points]
        axis = alt.X("time (s):T", title="time (UTC)")
    else:
        axis = alt.X("time (s):Q", title="video time (s)")
    chart = (alt.Chart(alt.Data(values=points)).mark_bar()
             .encode(x=axis, x2="end (s)", y=alt.Y("tracklets started:Q", stack="zero"),
                     color="camera:N", tooltip=["camera:N", "tracklets started:Q"]))
    st.altair_chart(chart, width="stretch")


def tracklet_page(repo: Repository, index: GalleryIndex | None, cameras, filters) -> None:
    st.header("Search by tracklet")
    st.caption("Pick a person seen by one camera; the dashboard ranks the tracklets of the "
               "other cameras by similarity of their tracklet descriptors.")
    if index is None or not index.size:
        st.info("The gallery is empty: no clip descriptors are stored yet.")
        return
    names = {c.id: c.name for c in cameras}
    chosen = st.session_state.get("query_tracklet")
    camera_ids = [c.id for c in cameras]
    picker, results = st.columns([2, 3], gap="large")
    with picker:
        default = 0
        if chosen is not None and (query := repo.get_tracklet(chosen)) is not None:
            default = camera_ids.index(query.camera_id) if query.camera_id in camera_ids else 0
        camera = st.selectbox("Camera", camera_ids, index=default,
                              format_func=lambda c: names.get(c, c), key="query_camera")
        time_range = filters["time_range"]
        total = repo.count_tracklets(camera_ids=[camera], time_range=time_range)
        if not total:
            st.info(f"No tracklet of camera {camera} in the selected time range.")
        else:
            offset = pager("Tracklets", total, GRID_PAGE_SIZE, key=f"grid_page_{camera}")
            page = repo.list_tracklets(camera_ids=[camera], time_range=time_range,
                                       offset=offset, limit=GRID_PAGE_SIZE, thumbnails=True)
            st.caption(f"{total} tracklets; showing {offset + 1}–{offset + len(page)}")
            for start in range(0, len(page), 3):
                for column, t in zip(st.columns(3), page[start:start + 3]):
                    with column:
                        show_image(t.thumbnail, f"{format_time(t.first_seen)} · #{t.id}")
                        st.button("Search", key=f"pick_{t.id}", on_click=select_tracklet,
                                  args=(t.id,), type="primary" if t.id == chosen else "secondary",
                                  width="stretch")
    with results:
        if chosen is None:
            st.info("Choose a tracklet on the left (its **Search** button).")
            return
        query = repo.get_tracklet(chosen)
        if query is None:
            st.warning(f"Tracklet {chosen} does not exist in this database.")
            return
        st.query_params["tracklet"] = str(chosen)
        top = st.columns([1, 3])
        with top[0]:
            show_image(query.thumbnail, "query")
        top[1].markdown(
            f"**Query: tracklet {query.id}**, camera {names.get(query.camera_id, query.camera_id)}"
            f", {format_time(query.first_seen)} – {format_time(query.last_seen)}, identity "
            f"{query.identity_id if query.identity_id else '–'}")
        k, max_distance = result_controls(index, "tracklet")
        others = [c for c in filters["cameras"] if c != query.camera_id]
        try:
            found = search_by_tracklet(repo, index, query.id, k, camera_ids=others,
                                       time_range=filters["time_range"],
                                       max_distance=max_distance)
        except DashboardError as exc:
            st.warning(str(exc))
            return
        show_results(found, names)


def upload_page(repo: Repository, index: GalleryIndex | None, cameras, filters,
                settings: DashboardSettings) -> None:
    st.header("Search by upload")
    if index is None or not index.size:
        st.info("The gallery is empty: no clip descriptors are stored yet, nothing to search.")
        return
    choice: EncoderChoice = choose_encoder(settings, repo)
    source = choice.checkpoint or f"{choice.model} (untrained, no checkpoint)"
    st.caption(f"Encoder: **{source}** — {choice.reason}. A search compares descriptors of the "
               "same network only, so this must be the encoder the watcher used "
               "(`keyreid-dashboard --checkpoint ...` to choose it).")
    try:
        network = encoder(choice.checkpoint, choice.model, choice.overrides, settings.device)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        st.error(f"Cannot load the encoder {source}: {exc}")
        return
    if network.model_id != index.model_id:
        st.error(f"This encoder produces descriptors of model `{network.model_id}`, but the "
                 f"gallery holds `{index.model_id}`: their distances would mean nothing. Start "
                 "the dashboard with the watcher's checkpoint (`--checkpoint`).")
        return
    uploads = st.file_uploader(
        "Photos of one person (JPEG, PNG, …) or one short video", accept_multiple_files=True,
        key="uploads", help=f"At most {settings.max_upload_mb:g} MB per file. The largest "
                            "person in each photo (or the most visible person in the video) is "
                            "cut out like the watcher's clips and encoded.")
    if not uploads:
        st.info("Upload one or more photos, or a short video, of the person to look for.")
        return
    files = [UploadedFile(u.name, u.getvalue()) for u in uploads]
    cache_key = tuple((f.name, len(f.data), hash(f.data)) for f in files)
    if st.session_state.get("upload_key") != cache_key:
        tracker, lock = person_tracker()
        try:
            with st.spinner("Finding the person and encoding…"), lock:
                policy = ClipPolicy(network.num_frames, choice.crop_margin, choice.clip_size)
                query = build_query_clip(files, tracker, policy,
                                         max_bytes=int(settings.max_upload_mb * 2**20))
                descriptor = network.encode(query.clip.crops[None], query.clip.keypoints[None])[0]
        except UploadError as exc:
            st.session_state.pop("upload_key", None)
            st.error(str(exc))
            return
        st.session_state["upload_key"] = cache_key
        st.session_state["upload_query"] = (query, descriptor)
    query, descriptor = st.session_state["upload_query"]
    for note in query.notes:
        st.warning(note)
    st.caption(f"Query clip from {', '.join(query.sources)} ({len(query.clip.crops)} frames):")
    for column, crop in zip(st.columns(GRID_COLUMNS), query.clip.crops):
        column.image(crop, width="stretch")
    k, max_distance = result_controls(index, "upload")
    found = search_by_descriptor(repo, index, descriptor, k, camera_ids=filters["cameras"],
                                 time_range=filters["time_range"], max_distance=max_distance)
    show_results(found, {c.id: c.name for c in cameras})


def identity_page(repo: Repository, settings: DashboardSettings, cameras) -> None:
    st.header("Identities")
    if "flash" in st.session_state:
        st.success(st.session_state.pop("flash"))
    total = repo.count_identities()
    if not total:
        st.info("No identity yet: the watcher creates them as it links tracklets.")
        return
    wanted = st.session_state.get("identity")
    offset = pager("Identities", total, IDENTITY_PAGE_SIZE, key="identity_page")
    listed = repo.list_identities(offset=offset, limit=IDENTITY_PAGE_SIZE)
    options = [i.id for i in listed]
    if wanted is not None and wanted not in options:
        record = repo.get_identity(wanted)
        if record is not None and record.merged_into is not None:
            st.info(f"Identity {wanted} was merged into {record.merged_into}; showing that one.")
            wanted = record.merged_into
            record = repo.get_identity(wanted)
        if record is not None and record.merged_into is None:
            listed.insert(0, record)
            options.insert(0, record.id)
    summaries = {i.id: i for i in listed}
    identity_id = st.selectbox(
        "Identity", options, index=options.index(wanted) if wanted in options else 0,
        format_func=lambda i: (f"{i} · {summaries[i].member_count} tracklets · "
                               f"{len(summaries[i].camera_ids)} cameras"))
    st.session_state["identity"] = identity_id
    st.query_params["identity"] = str(identity_id)
    identity = repo.get_identity(identity_id)
    members = repo.identity_members(identity_id)
    names = {c.id: c.name for c in cameras}
    st.markdown(f"**Identity {identity_id}**{f' ({identity.label})' if identity.label else ''}: "
                f"{identity.member_count} tracklets on {len(identity.camera_ids)} camera(s) "
                f"({', '.join(names.get(c, c) for c in identity.camera_ids) or '–'}), "
                f"{format_time(identity.first_time)} – {format_time(identity.last_time)}")
    if members:
        wall = is_wall_clock(members[0].first_seen)
        scale = 1000.0 if wall else 1.0  # Vega-Lite reads temporal values as epoch milliseconds
        rows = [{"camera": names.get(t.camera_id, t.camera_id), "from": t.first_seen * scale,
                 "to": max(t.last_seen, t.first_seen + 0.5) * scale, "tracklet": t.id}
                for t in members]
        axis = alt.X("from:T", title="time (UTC)") if wall else alt.X("from:Q",
                                                                       title="video time (s)")
        chart = (alt.Chart(alt.Data(values=rows)).mark_bar(height=14)
                 .encode(x=axis, x2="to",
                         y=alt.Y("camera:N", title=None), color=alt.Color("camera:N", legend=None),
                         tooltip=["tracklet:Q", "camera:N", "from:Q", "to:Q"]))
        st.altair_chart(chart, width="stretch")
        show_journey(repo, identity_id, {c: camera_label(c, names) for c in identity.camera_ids})
    st.subheader("Linking decisions")
    decisions = repo.link_decisions(identity_id=identity_id)
    if decisions:
        st.dataframe([{
            "decision": d.id, "tracklet": d.tracklet_id, "kind": d.kind,
            "identity": d.identity_id, "candidate": d.candidate_identity_id,
            "distance": None if d.distance is None else round(d.distance, 4),
            "similarity": "" if d.distance is None else f"{similarity_percent(d.distance):.0f}%",
            "chance it is wrong": "" if d.false_link is None else f"{d.false_link:.1%}",
            "why": d.reason or "",
            "when (UTC)": d.created_at.strftime("%Y-%m-%d %H:%M:%S"), "note": d.note or "",
        } for d in decisions], hide_index=True, width="stretch")
    else:
        st.caption("No decision recorded for this identity.")
    edit_identity(settings, identity_id, members, summaries)


def show_journey(repo: Repository, identity_id: int, names: dict[str, str]) -> None:
    """The identity's sightings in time order: where, when, how sure each link is, and the
    transit from the previous camera, so an operator can judge the identity at a glance."""
    st.subheader("Journey across cameras")
    sightings = journey(repo, identity_id, names)
    offset = 0
    if len(sightings) > JOURNEY_PAGE_SIZE:
        offset = pager("Sightings", len(sightings), JOURNEY_PAGE_SIZE,
                       key=f"journey_page_{identity_id}")
    for index in range(offset, min(offset + JOURNEY_PAGE_SIZE, len(sightings))):
        sighting, t = sightings[index], sightings[index].tracklet
        if index:
            st.caption("↓ " + transit_words(sighting, sightings[index - 1].camera))
        picture, words = st.columns([1, 7])
        with picture:
            show_image(t.thumbnail, f"#{t.id}", width=SMALL_THUMBNAIL_WIDTH)
        words.markdown(f"**{index + 1}. {sighting.camera}** · {format_time(t.first_seen)} – "
                       f"{format_time(t.last_seen)} ({format_duration(t.last_seen - t.first_seen)})"
                       f" · tracklet {t.id}  \nLink: {sighting.confidence}")


def edit_identity(settings: DashboardSettings, identity_id: int, members, summaries) -> None:
    with st.expander("Correct this identity (writes to the database)"):
        st.caption("Each change is one short storage transaction; it waits for the watcher's "
                   "current write and is recorded as a linking decision.")
        merge_form, split_form = st.columns(2)
        with merge_form:
            other = st.number_input("Identity to merge into this one", min_value=1, step=1,
                                    value=None, key="merge_other")
            if st.button("Merge", key="merge", disabled=other is None):
                try:
                    moved = merge_identities(settings.db_url, identity_id, int(other))
                except StorageError as exc:
                    st.error(f"Merge failed: {exc}")
                else:
                    flash(f"Merged identity {int(other)} into {identity_id}: "
                          f"{len(moved)} tracklet(s) moved.")
        with split_form:
            if len(members) < 2:
                st.caption("A tracklet can be split out when the identity has two or more.")
                return
            tracklet = st.selectbox("Tracklet to split out", [t.id for t in members],
                                    key="split_tracklet",
                                    format_func=lambda t: f"tracklet {t}")
            if st.button("Split out", key="split"):
                try:
                    new_id = split_tracklet(settings.db_url, int(tracklet))
                except StorageError as exc:
                    st.error(f"Split failed: {exc}")
                else:
                    flash(f"Tracklet {tracklet} now forms identity {new_id}.")


def unlinked_page(repo: Repository, index: GalleryIndex | None, cameras, filters,
                  settings: DashboardSettings) -> None:
    st.header("Unlinked tracklets")
    st.caption("Tracklets the linker left alone because it was not sure enough (or has not "
               "decided on yet), newest first, with the identities they resemble most on other "
               "cameras. **Confirm** puts the tracklet into that identity (a must-link); "
               "**Reject** tells the linker it is not that person (a cannot-link). The running "
               "watcher follows both.")
    if "flash" in st.session_state:
        st.success(st.session_state.pop("flash"))
    total = repo.count_unlinked(camera_ids=filters["cameras"], time_range=filters["time_range"])
    if not total:
        st.info("No unlinked tracklet: every finished tracklet of the selected cameras is in an "
                "identity with others, or the linker was sure it is someone new.")
        return
    offset = pager("Unlinked tracklets", total, UNLINKED_PAGE_SIZE, key="unlinked_page")
    page = repo.unlinked_tracklets(camera_ids=filters["cameras"],
                                   time_range=filters["time_range"], offset=offset,
                                   limit=UNLINKED_PAGE_SIZE)
    st.caption(f"{total} unlinked tracklets; showing {offset + 1}–{offset + len(page)}")
    names = {c.id: c.name for c in cameras}
    for tracklet in page:
        with st.container(border=True):
            show_unlinked(repo, index, tracklet, names, settings)


def show_unlinked(repo: Repository, index: GalleryIndex | None, t: TrackletRecord,
                  names: dict[str, str], settings: DashboardSettings) -> None:
    """One unlinked tracklet, its best candidate identities and the buttons that decide."""
    st.markdown(f"**Tracklet {t.id}** · {camera_label(t.camera_id, names)} · "
                f"{format_time(t.first_seen)} – {format_time(t.last_seen)} "
                f"({format_duration(t.last_seen - t.first_seen)})  \n{unlinked_reason(repo, t)}")
    if index is None or not index.size:
        st.caption("No clip descriptors are stored yet: no candidates to offer.")
        return
    try:
        candidates = candidate_identities(repo, index, t, limit=CANDIDATES)
    except DashboardError as exc:
        st.caption(str(exc))
        return
    query, *columns = st.columns([1] + [2] * CANDIDATES)
    with query:
        show_image(t.thumbnail, "this tracklet", width=SMALL_THUMBNAIL_WIDTH)
    if not candidates:
        columns[0].caption("No candidate identity on the other cameras (or all rejected).")
    for column, candidate in zip(columns, candidates):
        with column:
            show_candidate(settings, t, candidate, names)


def show_candidate(settings: DashboardSettings, t: TrackletRecord, candidate: Candidate,
                   names: dict[str, str]) -> None:
    """A candidate identity as its closest sightings, and the two answers an operator can give."""
    hits = candidate.hits[:CANDIDATES]
    thumbs = [h.tracklet.thumbnail for h in hits if h.tracklet and h.tracklet.thumbnail]
    if thumbs:
        st.image(thumbs, width=SMALL_THUMBNAIL_WIDTH)
    seen = sorted({names.get(h.hit.camera_id, h.hit.camera_id) for h in candidate.hits})
    st.markdown(f"**Identity {candidate.identity_id}** · {candidate.similarity:.0f}% similar  \n"
                f"seen on {', '.join(seen)}")
    confirm, reject = st.columns(2)
    key = f"{t.id}_{candidate.identity_id}"
    if confirm.button("Confirm", key=f"confirm_{key}", type="primary", width="stretch",
                      help=f"Tracklet {t.id} is this person: join identity "
                           f"{candidate.identity_id}"):
        try:
            joined = confirm_link(settings.db_url, t.id, candidate.identity_id)
        except StorageError as exc:
            st.error(f"Confirm failed: {exc}")
        else:
            flash(f"Tracklet {t.id} confirmed as identity {joined}.")
    if reject.button("Reject", key=f"reject_{key}", width="stretch",
                     help=f"Tracklet {t.id} is NOT the person of identity "
                          f"{candidate.identity_id}"):
        try:
            reject_link(settings.db_url, t.id, candidate.identity_id)
        except StorageError as exc:
            st.error(f"Reject failed: {exc}")
        else:
            flash(f"Tracklet {t.id} is not identity {candidate.identity_id}: recorded.")


def separation_gauge(auc: float) -> alt.LayerChart:
    """ROC AUC on a 0.5 (a coin toss) to 1.0 (perfect) bar, coloured by verdict band."""
    bands = [{"from": 0.5, "to": 0.7, "band": "does not separate"},
             {"from": 0.7, "to": 0.9, "band": "separates poorly"},
             {"from": 0.9, "to": 1.0, "band": "separates well"}]
    scale = alt.Scale(domain=[0.5, 1.0], clamp=True)
    row = alt.Y("row:N", axis=None)  # one row: the bar's thickness is the band's step
    colours = alt.Scale(domain=[b["band"] for b in bands], range=["#d62728", "#ff7f0e", "#2ca02c"])
    band = (alt.Chart(alt.Data(values=[{**b, "row": 0} for b in bands])).mark_bar(opacity=0.6)
            .encode(x=alt.X("from:Q", scale=scale, title="ROC AUC"), x2="to:Q", y=row,
                    color=alt.Color("band:N", scale=colours, legend=None), tooltip=["band:N"]))
    mark = alt.Chart(alt.Data(values=[{"auc": auc, "row": 0}])).encode(
        x=alt.X("auc:Q", scale=scale), y=row)
    return (band + mark.mark_tick(color="black", thickness=4, size=34)
            + mark.mark_text(align="left", dx=6, fontWeight="bold", fontSize=14).encode(
                text=alt.Text("auc:Q", format=".2f"))).properties(height=alt.Step(34))


def show_separation(calibration: dict | None) -> None:
    """The linker's gauge: does this model tell this site's people apart? (from its free labels:
    same-camera overlaps are different people, a tracklet's halves are the same person). Says
    "not calibrated" plainly rather than showing a number that means nothing yet."""
    st.subheader("Model separation")
    calibration = calibration or {}
    auc, threshold = calibration.get("auc"), calibration.get("threshold")
    ready = bool(calibration.get("ready"))
    genuine, impostor = calibration.get("genuine_count", 0), calibration.get("impostor_count", 0)
    target = calibration.get("target_false_link", 0.01)
    left, middle, right = st.columns(3)
    left.metric("ROC AUC" if ready else "ROC AUC (provisional)",
                "–" if auc is None else f"{auc:.2f}",
                help="How often a same-person pair is closer than a different-people pair: "
                     "0.5 is a coin toss, 1.0 perfect.")
    middle.metric("Links above", f"{similarity_percent(threshold):.0f}% similar"
                  if ready and threshold is not None else "–",
                  help=f"The current threshold: a lone candidate at least this similar links at "
                       f"the {target:.0%} false-link target (more candidates need more).")
    right.metric("Labels: same / different", f"{genuine:,} / {impostor:,}",
                 help="Same person: a tracklet's early and late halves. Different people: "
                      "tracklets of one camera overlapping in time.")
    if auc is not None:
        st.altair_chart(separation_gauge(float(auc)), width="stretch")
    if not calibration:
        st.info("Not calibrated yet: the latest watcher run has not reported its calibration. "
                "Tracklets stay unlinked rather than guessed.")
        return
    if not ready:
        reason = str(calibration.get("reason") or "too few labels").removeprefix("uncalibrated: ")
        st.info(f"Not calibrated yet: {reason}. Tracklets stay unlinked rather than guessed.")
        return
    labels = f"{genuine:,} same-person / {impostor:,} different-people labels"
    linking = ("" if threshold is not None else
               f" No similarity is high enough to link at the {target:.0%} false-link target, "
               "so it links nothing.")
    if auc >= 0.9:
        st.success(f"This model separates people within a camera well (ROC AUC {auc:.2f} from "
                   f"{labels}).{linking}")
    elif auc >= 0.7:
        st.warning(f"This model separates people within a camera poorly (ROC AUC {auc:.2f} from "
                   f"{labels}): expect few links.{linking}")
    else:
        st.error(f"This model does NOT separate people even within a camera (ROC AUC {auc:.2f} from "
                 f"{labels}): its links cannot be trusted; train or choose a better "
                 f"checkpoint.{linking}")
    st.caption("The free labels come from within each camera (a tracklet's halves, tracklets "
               "overlapping in time), so this is an upper bound: across cameras, viewpoint and "
               "light change a person's look, and no free label measures that. On a labelled "
               "synthetic scene a within-camera AUC of 0.95 went with 0.62 across cameras "
               "(scripts/evaluate_linking.sh).")


# -- the app ---------------------------------------------------------------------------------
def sidebar_filters(repo: Repository, cameras) -> dict:
    """Camera and time-range filters, applied to every listing and search."""
    st.sidebar.subheader("Filters")
    ids = [c.id for c in cameras]
    chosen = st.sidebar.multiselect("Cameras", ids, default=ids, key="filter_cameras")
    bounds = time_bounds(repo, cameras)
    time_range = None
    if bounds is not None and bounds[1] > bounds[0] and is_wall_clock(bounds[0]):
        low, high = (datetime.fromtimestamp(b, UTC).replace(tzinfo=None, microsecond=0)
                     for b in bounds)
        picked = st.sidebar.slider("Time (UTC)", min_value=low, max_value=high + timedelta(
            seconds=1), value=(low, high + timedelta(seconds=1)), step=timedelta(seconds=1),
            format="YYYY-MM-DD HH:mm:ss", key="filter_time")
        if picked != (low, high + timedelta(seconds=1)):
            time_range = tuple(p.replace(tzinfo=UTC).timestamp() for p in picked)
    elif bounds is not None and bounds[1] > bounds[0]:
        picked = st.sidebar.slider("Video time (s)", min_value=bounds[0], max_value=bounds[1],
                                   value=bounds, step=1.0, key="filter_time")
        if picked != bounds:
            time_range = (float(picked[0]), float(picked[1]))
    return {"cameras": chosen or ids, "time_range": time_range}


def choose_model(repo: Repository) -> str | None:
    models = repo.model_ids()
    if len(models) > 1:
        return st.sidebar.selectbox("Descriptor model", models, key="model_id",
                                    help="The database holds clips of several encoders; "
                                         "searches use one.")
    return models[0] if models else None


def main() -> None:
    st.set_page_config(page_title="KeyRe-ID Watch", layout="wide")
    try:
        settings = DashboardSettings.from_env()
        repo = repository(settings.db_url)
    except DashboardError as exc:
        st.title("KeyRe-ID Watch")
        st.error(str(exc))
        return
    init_state()
    st.sidebar.title("KeyRe-ID Watch")
    st.sidebar.caption(f"{repo.url} · read-only")
    page = st.sidebar.radio("Page", list(PAGES), format_func=PAGES.get, key="page")
    st.query_params["page"] = page
    if st.sidebar.button("Refresh"):
        st.rerun()
    try:
        cameras = repo.list_cameras()
        filters = sidebar_filters(repo, cameras)
        model_id = choose_model(repo)
        index = (gallery(repo, settings.db_url, model_id, repo.stats().clips)
                 if model_id is not None else None)
        if page == "overview":
            overview_page(repo, index, cameras, filters)
        elif page == "tracklet":
            tracklet_page(repo, index, cameras, filters)
        elif page == "upload":
            upload_page(repo, index, cameras, filters, settings)
        elif page == "unlinked":
            unlinked_page(repo, index, cameras, filters, settings)
        else:
            identity_page(repo, settings, cameras)
    except StorageError as exc:
        st.error(f"Database error: {exc}")


main()
