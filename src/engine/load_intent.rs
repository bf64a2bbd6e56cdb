//! Which model load the game wants now, when some of them wait for a
//! download: pure, no Bevy or llama types. The newest `LoadModel` or
//! `UnloadModel` wins, whatever order downloads finish or fail in; a
//! download's progress, arrival or failure matters only while the load that
//! waits for it is still the wanted one.

/// A load the game asked for, as the control system resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// The registry id whose file is downloading.
    pub id: String,
    /// The `LoadModel::model` argument, to resolve again when the file is here.
    pub arg: Option<String>,
}

/// What happened, in the order the control system saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoadInput {
    /// A load that needs `id`'s file downloaded first.
    LoadAfterDownload(Wanted),
    /// A load that starts now (file on disk, a remote server, or a failure
    /// decided at once).
    LoadNow,
    /// `UnloadModel`.
    Unload,
    /// Progress of a download.
    Progress(String),
    /// A download finished.
    Downloaded(String),
    /// A download failed.
    DownloadFailed(String),
}

/// What the control system does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoadDecision {
    /// Nothing (an old download's news, or nothing waits).
    Ignore,
    /// Show the waiting load's download progress.
    ShowProgress,
    /// The waited-for file is here: start the load again with this argument.
    Load(Option<String>),
    /// The waited-for download failed: the load fails, and so do requests
    /// that wait for a model (none are served).
    FailWaiting,
}

/// The load that waits for a download, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LoadIntent {
    waiting: Option<Wanted>,
}

impl LoadIntent {
    /// The load waiting for its file.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> Option<&Wanted> {
        self.waiting.as_ref()
    }

    /// Apply one input; the decision for the control system.
    pub(crate) fn on(&mut self, input: LoadInput) -> LoadDecision {
        let waits_for = |w: &Option<Wanted>, id: &str| w.as_ref().is_some_and(|w| w.id == id);
        match input {
            LoadInput::LoadAfterDownload(w) => {
                self.waiting = Some(w);
                LoadDecision::Ignore
            }
            LoadInput::LoadNow | LoadInput::Unload => {
                self.waiting = None;
                LoadDecision::Ignore
            }
            LoadInput::Progress(id) if waits_for(&self.waiting, &id) => LoadDecision::ShowProgress,
            LoadInput::Downloaded(id) if waits_for(&self.waiting, &id) => {
                let w = self.waiting.take().expect("checked");
                LoadDecision::Load(w.arg)
            }
            LoadInput::DownloadFailed(id) if waits_for(&self.waiting, &id) => {
                self.waiting = None;
                LoadDecision::FailWaiting
            }
            LoadInput::Progress(_) | LoadInput::Downloaded(_) | LoadInput::DownloadFailed(_) => {
                LoadDecision::Ignore
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(id: &str) -> Wanted {
        Wanted {
            id: id.into(),
            arg: Some(id.into()),
        }
    }

    /// Every (state, input) pair: nothing waits, B waits.
    #[test]
    fn table_of_every_state_and_input() {
        use LoadDecision as D;
        use LoadInput as I;
        let b = Some(w("b"));
        let table: Vec<(Option<Wanted>, LoadInput, D, Option<Wanted>)> = vec![
            (None, I::LoadAfterDownload(w("b")), D::Ignore, b.clone()),
            (None, I::LoadNow, D::Ignore, None),
            (None, I::Unload, D::Ignore, None),
            (None, I::Progress("b".into()), D::Ignore, None),
            (None, I::Downloaded("b".into()), D::Ignore, None),
            (None, I::DownloadFailed("b".into()), D::Ignore, None),
            // B waits.
            (
                b.clone(),
                I::LoadAfterDownload(w("c")),
                D::Ignore,
                Some(w("c")),
            ),
            (
                b.clone(),
                I::LoadAfterDownload(w("b")),
                D::Ignore,
                b.clone(),
            ),
            (b.clone(), I::LoadNow, D::Ignore, None),
            (b.clone(), I::Unload, D::Ignore, None),
            (
                b.clone(),
                I::Progress("b".into()),
                D::ShowProgress,
                b.clone(),
            ),
            (b.clone(), I::Progress("a".into()), D::Ignore, b.clone()),
            (
                b.clone(),
                I::Downloaded("b".into()),
                D::Load(Some("b".into())),
                None,
            ),
            (b.clone(), I::Downloaded("a".into()), D::Ignore, b.clone()),
            (
                b.clone(),
                I::DownloadFailed("b".into()),
                D::FailWaiting,
                None,
            ),
            (
                b.clone(),
                I::DownloadFailed("a".into()),
                D::Ignore,
                b.clone(),
            ),
        ];
        for (before, input, decision, after) in table {
            let mut m = LoadIntent {
                waiting: before.clone(),
            };
            assert_eq!(m.on(input.clone()), decision, "{before:?} + {input:?}");
            assert_eq!(m.waiting, after, "{before:?} + {input:?}");
        }
    }

    fn input() -> impl Strategy<Value = LoadInput> {
        let id = prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(String::from);
        prop_oneof![
            id.clone().prop_map(|i| LoadInput::LoadAfterDownload(w(&i))),
            Just(LoadInput::LoadNow),
            Just(LoadInput::Unload),
            id.clone().prop_map(LoadInput::Progress),
            id.clone().prop_map(LoadInput::Downloaded),
            id.prop_map(LoadInput::DownloadFailed),
        ]
    }

    proptest! {
        /// Against a reference (the newest load or unload asked for): a
        /// model is loaded only when it is the newest wish and its download
        /// just arrived; a failure fails only the newest wish's download;
        /// progress shows only for it; every load decided at once ends any
        /// wait.
        #[test]
        fn the_newest_load_or_unload_wins(inputs in prop::collection::vec(input(), 0..40)) {
            let mut m = LoadIntent::default();
            // The reference: the newest wish, and whether it still waits.
            let mut newest: Option<(Wanted, bool)> = None;
            for i in inputs {
                let d = m.on(i.clone());
                match &i {
                    LoadInput::LoadAfterDownload(w) => newest = Some((w.clone(), true)),
                    LoadInput::LoadNow | LoadInput::Unload => newest = None,
                    LoadInput::Progress(id) => {
                        let wanted = newest.as_ref().is_some_and(|(w, waits)| *waits && w.id == *id);
                        prop_assert_eq!(d == LoadDecision::ShowProgress, wanted);
                    }
                    LoadInput::Downloaded(id) => {
                        let wanted = newest.as_ref().is_some_and(|(w, waits)| *waits && w.id == *id);
                        if wanted {
                            let (w, _) = newest.take().unwrap();
                            prop_assert_eq!(d, LoadDecision::Load(w.arg));
                        } else {
                            prop_assert_eq!(d, LoadDecision::Ignore);
                        }
                    }
                    LoadInput::DownloadFailed(id) => {
                        let wanted = newest.as_ref().is_some_and(|(w, waits)| *waits && w.id == *id);
                        if wanted {
                            newest = None;
                            prop_assert_eq!(d, LoadDecision::FailWaiting);
                        } else {
                            prop_assert_eq!(d, LoadDecision::Ignore);
                        }
                    }
                }
                prop_assert_eq!(
                    m.waiting(),
                    newest.as_ref().filter(|(_, waits)| *waits).map(|(w, _)| w)
                );
            }
        }
    }
}
