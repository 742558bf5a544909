"""The watcher's link stage: the site's one linker, fed finished tracklets from the database.

Input: tracklets the database holds as finished and unlinked (every watcher's of the site, in
the order they ended), the operator's decisions since the last look, and, for this watcher's own
tracklets, their exact descriptors (`tracklet_finished`). Output: identity decisions, stored
through the repository as the linker makes them (`tracking.linking.Linker`'s `record` hook), and
the linker's calibration, stored with the run so that the next run of the model starts from it.

Only the watcher holding the site's linker lock links (`claim`); the others store only and try
again every `CLAIM_INTERVAL_S`. The database being unavailable is the watcher's business: this
stage reports it (`unavailable`) and the watcher decides when to call again.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from storage import OPERATOR_KINDS, Repository, StorageError, StorageUnavailableError, UnlinkedTracklet
from storage.similarity import unit
from tracking.linking import Calibrator, Decision, Linker, LinkerConfig, Member, TrackletSummary

from .config import LinkingConfig
from .encoder_service import EncoderInfo

LOG = logging.getLogger("keyreid.watch")
RELINK_INTERVAL_S = 1.0  # pending tracklets are re-decided (and finished ones fetched) this often
CLAIM_INTERVAL_S = 2.0  # a watcher that does not link tries to take the linker lock this often
LINK_BATCH = 500  # finished tracklets fetched from the database per linking pass
CALIBRATION_INTERVAL_S = 10.0  # the linker's separation is stored this often
CALIBRATION_SAMPLES_KEPT = 2000  # recent labels per class stored with it, for the next run


class SiteLinking:
    """Links the site's finished tracklets while this watcher holds the linker lock.

    `unavailable(reason)`: called when the database is unreachable (the caller spools and backs
    off); `direct(what, write)`: the caller's unspooled write, for the calibration record.
    """

    def __init__(self, settings: LinkingConfig, repo: Repository, encoder: EncoderInfo, run_id: int, *,
                 start_over: bool, unavailable: Callable[[str], None],
                 direct: Callable[[str, Callable[[], None]], bool]) -> None:
        self.settings = settings
        self.repo = repo
        self.encoder = encoder
        self.run_id = run_id
        self.start_over = start_over
        self._unavailable = unavailable
        self._direct = direct
        # Set while this watcher is the site's linker (`claim`); None: it stores only.
        self.linker: Linker | None = None
        self._own_finished: dict[int, TrackletSummary] = {}  # exact descriptors, until linked
        self._storing_only_said = False
        self._last_claim = self._last_relink = self._last_calibration = 0.0
        self._last_operator_change = 0
        self.identities_opened = 0
        self.links_made = 0
        self.seconds = 0.0

    # -- the linker lock -----------------------------------------------------------------------
    def claim(self, now: float | None = None) -> None:
        """Become the site's linker if no other watcher is (on SQLite at once: its one writer
        links); given `now`, at most every `CLAIM_INTERVAL_S`. The linker starts from what the
        database knows: the labels of the newest earlier run of the model, the identities seen
        within the time window, the operator's decisions from now on. Until then this watcher
        stores only, and says so once."""
        if not self.settings.enabled or self.linker is not None:
            return
        if now is not None:
            if now - self._last_claim < CLAIM_INTERVAL_S:
                return
            self._last_claim = now
        try:
            if not self.repo.claim_linker():
                if not self._storing_only_said:
                    LOG.info("another watcher links this site's tracklets (it holds the linker "
                             "lock of %s): this watcher stores only, and takes linking over if "
                             "that one stops", self.repo.url)
                    self._storing_only_said = True
                return
            settings = self.settings
            config = LinkerConfig(target_false_link=settings.target_false_link, margin=settings.margin,
                                  mutual=settings.mutual, time_window=settings.time_window,
                                  transit_prior=settings.transit_prior)
            self.linker = Linker(config, record=self._record_decision,
                                 calibrator=self._earlier_calibration(config))
            if not self.start_over:
                self._continue_identities()
            self._last_operator_change = self.repo.last_decision_id()
        except StorageUnavailableError as exc:
            self.linker = None
            self._unavailable(str(exc))
            return
        if self._storing_only_said:
            LOG.warning("this watcher takes over linking the site's tracklets (the watcher "
                        "that linked them stopped)")
        elif not self.repo.is_sqlite:
            LOG.info("this watcher links the site's tracklets, its own and other watchers' "
                     "(it holds the linker lock of %s)", self.repo.url)

    def _earlier_calibration(self, config: LinkerConfig) -> Calibrator:
        """The labels of the newest earlier run of this model: a restarted watcher decides with
        what it had learnt instead of waiting for 50 new labels of each kind. A site-adapted
        checkpoint adds its cross-camera genuine labels (`reid.Encoder.cross_camera_genuine`)."""
        model_id = self.encoder.model_id
        calibrator = Calibrator(config.calibration, model_id)
        runs = [] if self.start_over else sorted(self.repo.list_runs(), key=lambda r: r.id, reverse=True)
        for run in runs:
            stored = run.calibration or {}
            if run.id != self.run_id and stored.get("model_id") == model_id \
                    and stored.get("genuine_samples") is not None:
                calibrator = Calibrator(config.calibration, model_id,
                                        stored["genuine_samples"], stored["impostor_samples"])
                LOG.info("linker calibration continues from run %d: %s", run.id,
                         calibrator.status())
                break
        cross_genuine = self.encoder.cross_camera_genuine
        if cross_genuine is not None and len(cross_genuine):
            calibrator.add_cross_genuine(cross_genuine)
            LOG.info("linker: %d cross-camera genuine labels from the site-adapted checkpoint "
                     "(median distance %.2f)", len(cross_genuine), float(np.median(cross_genuine)))
        return calibrator

    def _continue_identities(self) -> None:
        """Identities seen within the time window (wall clock) stay candidates across a
        restart: their members are loaded with their descriptors, prototypes rebuilt."""
        window = self.settings.time_window
        since = time.time() - window if window is not None else -np.inf
        snapshots = self.repo.recent_identities(since, self.encoder.model_id)
        for snapshot in snapshots:
            members = [Member(m.tracklet_id, m.camera_id, m.first_time, m.last_time, m.descriptor)
                       for m in snapshot.members]
            total = np.sum([m.descriptor for m in snapshot.members], axis=0)
            self.linker.add_identity(snapshot.identity_id, unit(total), members,
                                     weight=float(np.linalg.norm(total)))
        if snapshots:
            LOG.info("linking continues %d identities of earlier runs (seen in the last %s)",
                     len(snapshots), "any time" if window is None else f"{window:.0f} s")

    @property
    def active(self) -> bool:
        """Whether this watcher is the site's linker now."""
        return self.linker is not None

    # -- inputs ----------------------------------------------------------------------------------
    def tracklet_finished(self, summary: TrackletSummary) -> None:
        """One of this watcher's tracklets is complete in the database: while linking, keep its
        exact descriptors for the moment the linker takes it (the stored ones are float16)."""
        if self.active:
            self._own_finished[summary.key] = summary

    def identities_deleted(self, identity_ids: list[int]) -> None:
        """Retention deleted these identities: they are no candidates any more."""
        if self.linker is not None:
            for identity_id in identity_ids:
                self.linker.remove_identity(identity_id)

    def _sync_operator_changes(self) -> None:
        """The operator's decisions in the dashboard since the last look become linker facts:
        merged / confirmed = must-link, split / rejected = cannot-link."""
        for change in self.repo.link_decisions(kinds=OPERATOR_KINDS, after_id=self._last_operator_change):
            if change.kind == "merged":
                self.linker.merge(change.identity_id, change.candidate_identity_id)
            elif change.kind == "split":
                self.linker.split(change.tracklet_id, change.identity_id)
            elif change.kind == "confirmed":
                self._apply_confirmation(change.tracklet_id, change.identity_id)
            else:
                self._apply_rejection(change.tracklet_id, change.identity_id)
            self._last_operator_change = change.id

    def _apply_rejection(self, tracklet_id: int, identity_id: int) -> None:
        """An operator's cannot-link; if the linker joined the two since the click, the
        operator wins: the tracklet is split out again."""
        if self.linker.identity_of(tracklet_id) == identity_id:
            new_id = self.repo.split_tracklet(tracklet_id, note="operator's rejection applied by the watcher")
            self.linker.split(tracklet_id, new_id)
        self.linker.cannot_link(tracklet_id, identity_id)

    def _apply_confirmation(self, tracklet_id: int, identity_id: int) -> None:
        """An operator's must-link. The linker may have decided the tracklet between the
        operator's click and this look (its record overwrote the confirmation): the operator
        wins, so the confirmation is written again."""
        self.linker.must_link(tracklet_id, identity_id)
        tracklet = self.repo.get_tracklet(tracklet_id)
        if tracklet is not None and tracklet.identity_id != identity_id:
            self.repo.confirm_link(tracklet_id, identity_id,
                                   note="operator's confirmation applied again by the watcher")

    def _summary(self, row: UnlinkedTracklet) -> TrackletSummary:
        """What the linker needs of a finished tracklet: this watcher's own exact descriptors
        when it has them, else (another watcher's, or one finished before this watcher took
        linking over) as stored, with the operator's rejections stored for it so far."""
        own = self._own_finished.pop(row.tracklet_id, None)
        if own is not None:
            return own
        for identity_id in self.repo.rejected_identities(row.tracklet_id):
            self.linker.cannot_link(row.tracklet_id, identity_id)
        return TrackletSummary.from_clips(row.tracklet_id, row.camera_id, row.clips, row.clip_times,
                                          first_time=row.first_time, last_time=row.last_time)

    # -- outputs ---------------------------------------------------------------------------------
    def _record_decision(self, decision: Decision) -> int:
        """The linker's hook: store a "new" or "linked" decision, with its evidence."""
        evidence = {"margin": decision.margin, "false_link": decision.false_link, "reason": decision.reason}
        if decision.kind == "new":
            identity = self.repo.open_identity(decision.key, decision.distance, decision.candidate,
                                               evidence=evidence)
            self.identities_opened += 1
        else:
            identity = self.repo.assign_identity(decision.key, decision.identity_id, decision.kind,
                                                 decision.distance, decision.candidate,
                                                 follow_merges=True, evidence=evidence)
            self.links_made += 1
        return identity

    def _calibration_record(self) -> dict:
        """What `runs.calibration` holds: the separation figures the dashboard shows, and the
        most recent labels, which the next run of this model starts from."""
        calibrator = self.linker.calibrator
        recent = lambda values: [round(float(v), 5)  # noqa: E731
                                 for v in values[-CALIBRATION_SAMPLES_KEPT:]]
        return {**asdict(self.linker.separation()), "model_id": calibrator.model_id,
                "genuine_samples": recent(calibrator.genuine_samples()),
                "impostor_samples": recent(calibrator.impostor_samples())}

    # -- the stage's step ------------------------------------------------------------------------
    def link_ready(self, final: bool = False) -> None:
        """Link every `RELINK_INTERVAL_S` (and once more at the end): pending tracklets are
        re-decided as evidence arrives. A watcher that lost the linker lock (its connection
        broke) stops linking; what it held is still unlinked in the database for the next one."""
        if self.linker is None:
            return
        now = time.monotonic()
        if not final and now - self._last_relink < RELINK_INTERVAL_S:
            return
        self._last_relink = now
        try:
            if not self.repo.claim_linker():
                LOG.error("this watcher lost the site's linker lock (its database connection "
                          "broke): it stores only from now on; another watcher links")
                self.linker, self._storing_only_said = None, True
                self._own_finished.clear()
                return
            self._link_pass(final)
        except StorageUnavailableError as exc:
            self._unavailable(str(exc))
        except StorageError as exc:  # e.g. a merge raced us: resync and retry next time
            LOG.warning("linking deferred: %s", exc)
        self.seconds += time.monotonic() - now
        if final or now - self._last_calibration >= CALIBRATION_INTERVAL_S:
            self._last_calibration = now
            # Identities no tracklet can reach any more (outside the time window) leave memory;
            # they stay in the database, and a restart within the window reloads them.
            self.linker.evict(time.time())
            calibration = self._calibration_record()
            self._direct("the linker's calibration",
                         lambda: self.repo.update_run_calibration(self.run_id, calibration))

    def _link_pass(self, final: bool) -> None:
        """Fetch finished tracklets no identity holds yet (every watcher's, in the order they
        ended), apply the operator's decisions, and let the linker decide them and re-decide
        its pending ones. At the end of a run what is still pending opens identities of its
        own, unless another watcher of the site is alive to take linking over."""
        while True:
            rows = self.repo.tracklets_to_link(self.encoder.model_id, exclude=self.linker.pending_keys(),
                                               limit=LINK_BATCH)
            self._sync_operator_changes()
            self.linker.link([self._summary(row) for row in rows], now=time.time())
            if len(rows) < LINK_BATCH or not final:
                break
        if final and not self.repo.other_writers_alive(self.run_id):
            self.linker.flush()

    # -- what the watcher shows ------------------------------------------------------------------
    def status(self) -> str:
        """The linker's part of the watcher's status line."""
        if self.linker is None:
            return "linker: another watcher links" if self.settings.enabled else "linking off"
        separation = self.linker.separation()
        return (f"linker: {len(self.linker.pending_keys())} pending, "
                + (f"AUC {separation.auc:.2f}" if separation.auc is not None else "not calibrated yet"))

    def separation(self) -> str:
        """The linker's separation figures ("" when this watcher does not link)."""
        return "" if self.linker is None else str(self.linker.separation())
