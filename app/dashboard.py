"""KeyRe-ID Watch dashboard (Streamlit): where else was this person seen, and when?

Start it with `keyreid-dashboard --db URL`; it reads the database the watcher writes through a
read-only storage repository (it never blocks the watcher). Merging identities and splitting
a tracklet out are the only writes, each one short storage transaction.

Pages: Overview, Search by tracklet, Search by upload, Identities. The URL carries the page
and the selection (`?page=tracklet&tracklet=12`, `?page=identity&identity=3`), so a view can
be bookmarked or shared.
"""
from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import altair as alt
import streamlit as st

from app.dashboard_data import (
    AnnotatedHit,
    DashboardError,
    DashboardSettings,
    EncoderChoice,
    activity_points,
    camera_rows,
    choose_encoder,
    distance_scale,
    format_time,
    is_wall_clock,
    merge_identities,
    open_readonly,
    search_by_descriptor,
    search_by_tracklet,
    split_tracklet,
    time_bounds,
)
from app.dashboard_upload import ClipPolicy, UploadedFile, UploadError, build_query_clip
from storage import GalleryIndex, Repository, StorageError
from storage.similarity import similarity_percent

PAGES = {
    "overview": "Overview",
    "tracklet": "Search by tracklet",
    "upload": "Search by upload",
    "identity": "Identities",
}
GRID_COLUMNS = 6
GRID_PAGE_SIZE = 24
IDENTITY_PAGE_SIZE = 50
POSE_IMGSZ = 1280
THUMBNAIL_WIDTH = 120


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
    """The result-count slider and the distance cut-off slider (its top means "no cut-off")."""
    left, right = st.columns(2)
    k = left.slider("Results", min_value=1, max_value=50, value=10, key=f"{key}_k")
    top = round(distance_scale(index), 2)
    cut = right.slider("Distance cut-off", min_value=0.0, max_value=top, value=top,
                       step=max(top / 200, 0.01), key=f"{key}_cut",
                       help="Hide matches farther than this (Euclidean distance between "
                            "descriptors). At the far right nothing is hidden.")
    return k, None if cut >= top else float(cut)


def show_results(results: list[AnnotatedHit], cameras: dict[str, str]) -> None:
    if not results:
        st.info("No match within the filters and the distance cut-off.")
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
                    f"**distance {hit.distance:.3f}**  \n"
                    f"{format_time(hit.first_time)} – {format_time(hit.last_time)}  \n"
                    f"tracklet {hit.tracklet_id} · identity {identity if identity else '–'}"
                    + ("  \n:green[**same identity**]" if item.same_identity else ""))
    st.dataframe([{
        "rank": r.hit.rank, "distance": round(r.hit.distance, 4), "camera": r.hit.camera_id,
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
        show_separation(last.calibration)
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
    chart = (alt.Chart(alt.Data(values=points)).mark_bar()
             .encode(x=alt.X("time (s):Q", title="video time (s)"), x2="end (s):Q",
                     y=alt.Y("tracklets started:Q", stack="zero"), color="camera:N",
                     tooltip=["camera:N", "time (s):Q", "tracklets started:Q"]))
    st.altair_chart(chart, width="stretch")


def tracklet_page(repo: Repository, index: GalleryIndex | None, cameras, filters) -> None:
    st.header("Search by tracklet")
    st.caption("Pick a person seen by one camera; the dashboard ranks the tracklets of the "
               "other cameras by descriptor distance (best clip of each tracklet).")
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
        for camera_id in identity.camera_ids:
            st.subheader(camera_label(camera_id, names))
            seen = [t for t in members if t.camera_id == camera_id]
            for start in range(0, len(seen), GRID_COLUMNS):
                for column, t in zip(st.columns(GRID_COLUMNS), seen[start:start + GRID_COLUMNS]):
                    with column:
                        show_image(t.thumbnail, f"{format_time(t.first_seen)} – "
                                                f"{format_time(t.last_seen)} · #{t.id}")
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


def show_separation(calibration: dict | None) -> None:
    """The linker's gauge: does this model tell this site's people apart? (from its free labels:
    same-camera overlaps are different people, a tracklet's halves are the same person)."""
    if not calibration:
        return
    auc = calibration.get("auc")
    if auc is None:
        st.info(f"Identity linking: not calibrated yet ({calibration.get('reason', '')}). "
                "Tracklets stay unlinked rather than guessed.")
        return
    verdict = ("tells people apart" if auc >= 0.9 else "tells people apart poorly"
               if auc >= 0.7 else "does NOT tell people apart")
    labels = f"{calibration.get('genuine_count', 0)} same-person / " \
             f"{calibration.get('impostor_count', 0)} different-people labels"
    show = st.success if auc >= 0.9 else st.warning if auc >= 0.7 else st.error
    linking = "" if calibration.get("ready") else f" Not linking yet: {calibration.get('reason')}."
    show(f"Identity linking: this model {verdict} on this site (separation AUC {auc:.2f} from "
         f"{labels}).{linking}")


# -- the app ---------------------------------------------------------------------------------
def sidebar_filters(repo: Repository, cameras) -> dict:
    """Camera and time-range filters, applied to every listing and search."""
    st.sidebar.subheader("Filters")
    ids = [c.id for c in cameras]
    chosen = st.sidebar.multiselect("Cameras", ids, default=ids, key="filter_cameras")
    bounds = time_bounds(repo, cameras)
    time_range = None
    if bounds is not None and bounds[1] > bounds[0] and is_wall_clock(bounds[0]):
        low, high = (datetime.fromtimestamp(b, timezone.utc).replace(tzinfo=None, microsecond=0)
                     for b in bounds)
        picked = st.sidebar.slider("Time (UTC)", min_value=low, max_value=high + timedelta(
            seconds=1), value=(low, high + timedelta(seconds=1)), step=timedelta(seconds=1),
            format="YYYY-MM-DD HH:mm:ss", key="filter_time")
        if picked != (low, high + timedelta(seconds=1)):
            time_range = tuple(p.replace(tzinfo=timezone.utc).timestamp() for p in picked)
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
        else:
            identity_page(repo, settings, cameras)
    except StorageError as exc:
        st.error(f"Database error: {exc}")


main()
