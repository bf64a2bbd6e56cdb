//! The conversation machine, model-free: every (state, event) pair, and
//! properties over random event sequences.

use super::*;
use proptest::prelude::*;

const T: ConversationTimeouts = ConversationTimeouts {
    line_secs: 60.0,
    player_idle_secs: 300.0,
    summary_secs: 60.0,
};
const NOW: f64 = 100.0;
const LATE: f64 = 100.0 + 1000.0;

fn npc_conv(phase: Phase, npc_lines: usize, next: usize) -> Machine {
    let mut m = Machine::new(
        2,
        false,
        8,
        ConversationState::Active,
        next,
        npc_lines,
        npc_lines,
        NOW,
    );
    m.phase = phase;
    m
}

fn player_conv(phase: Phase, transcript: usize, unanswered: usize, queued: usize) -> Machine {
    let mut m = Machine::new(
        1,
        true,
        8,
        ConversationState::AwaitingPlayer,
        0,
        transcript,
        transcript - unanswered,
        NOW,
    );
    m.phase = phase;
    m.unanswered = unanswered;
    m.queued = queued;
    m
}

/// Every state the table covers, by name.
fn states() -> Vec<(&'static str, Machine)> {
    let mut closing = npc_conv(
        Phase::Speaking {
            speaker: 1,
            attempt: 0,
        },
        7,
        1,
    );
    closing.closing = true;
    vec![
        (
            "npc speaking",
            npc_conv(
                Phase::Speaking {
                    speaker: 0,
                    attempt: 0,
                },
                0,
                0,
            ),
        ),
        (
            "npc retrying",
            npc_conv(
                Phase::Speaking {
                    speaker: 1,
                    attempt: 1,
                },
                3,
                1,
            ),
        ),
        ("npc closing", closing),
        (
            "player speaking",
            player_conv(
                Phase::Speaking {
                    speaker: 0,
                    attempt: 0,
                },
                1,
                1,
                0,
            ),
        ),
        (
            "player speaking, 1 held",
            player_conv(
                Phase::Speaking {
                    speaker: 0,
                    attempt: 0,
                },
                1,
                1,
                1,
            ),
        ),
        ("awaiting player", {
            let mut m = player_conv(Phase::AwaitingPlayer, 2, 0, 0);
            m.next_speaker = 1;
            m
        }),
        (
            "summarizing 2",
            npc_conv(Phase::Summarizing { left: 2 }, 8, 0),
        ),
        (
            "summarizing 1",
            npc_conv(Phase::Summarizing { left: 1 }, 8, 0),
        ),
        ("ended", npc_conv(Phase::Ended, 8, 0)),
    ]
}

/// Every event the table covers, with the time it arrives.
fn events() -> Vec<(&'static str, Event, f64)> {
    vec![
        ("begin", Event::Begin, NOW),
        (
            "line ok",
            Event::LineDone {
                usable: true,
                goodbye: false,
            },
            NOW,
        ),
        (
            "line ok goodbye",
            Event::LineDone {
                usable: true,
                goodbye: true,
            },
            NOW,
        ),
        (
            "line bad",
            Event::LineDone {
                usable: false,
                goodbye: false,
            },
            NOW,
        ),
        ("line failed", Event::LineFailed, NOW),
        ("line cancelled", Event::LineCancelled, NOW),
        ("player says", Event::PlayerSays, NOW),
        ("player leaves", Event::PlayerLeaves, NOW),
        ("npc 0 gone", Event::NpcGone(0), NOW),
        ("npc 1 gone", Event::NpcGone(1), NOW),
        ("summary done", Event::SummaryDone, NOW),
        ("tick", Event::Tick, NOW + 1.0),
        ("tick late", Event::Tick, LATE),
    ]
}

use Command::*;
fn sp(speaker: usize, attempt: u32) -> Phase {
    Phase::Speaking { speaker, attempt }
}
fn req(speaker: usize, attempt: u32, closing: bool) -> Command {
    RequestLine {
        speaker,
        attempt,
        closing,
    }
}
fn app(speaker: usize, fallback: bool, retried: bool, closing: bool) -> Command {
    AppendLine {
        speaker,
        fallback,
        retried,
        closing,
    }
}

/// The expected (phase, public state, commands) of every pair that does
/// something; every pair not listed must change nothing and command nothing.
#[allow(clippy::type_complexity)]
fn table() -> Vec<(
    &'static str,
    &'static str,
    Phase,
    ConversationState,
    Vec<Command>,
)> {
    use ConversationState as S;
    let sum = |left| Phase::Summarizing { left };
    vec![
        // NPC conversation, first line in flight.
        (
            "npc speaking",
            "line ok",
            sp(1, 0),
            S::Active,
            vec![app(0, false, false, false), req(1, 0, false)],
        ),
        (
            "npc speaking",
            "line ok goodbye",
            sp(1, 0),
            S::Active,
            vec![app(0, false, false, false), req(1, 0, false)],
        ),
        (
            "npc speaking",
            "line bad",
            sp(0, 1),
            S::Active,
            vec![req(0, 1, false)],
        ),
        (
            "npc speaking",
            "line failed",
            sp(0, 1),
            S::Active,
            vec![req(0, 1, false)],
        ),
        (
            "npc speaking",
            "line cancelled",
            sp(0, 1),
            S::Active,
            vec![req(0, 1, false)],
        ),
        (
            "npc speaking",
            "player says",
            sp(0, 0),
            S::Active,
            vec![RejectPlayerLine],
        ),
        (
            "npc speaking",
            "npc 0 gone",
            Phase::Ended,
            S::Ended,
            vec![CancelLine, End { unanswered: 0 }],
        ),
        (
            "npc speaking",
            "npc 1 gone",
            Phase::Ended,
            S::Ended,
            vec![CancelLine, End { unanswered: 0 }],
        ),
        (
            "npc speaking",
            "tick late",
            sp(0, 1),
            S::Active,
            vec![CancelLine, req(0, 1, false)],
        ),
        // NPC conversation, a retry in flight after three lines.
        (
            "npc retrying",
            "line ok",
            sp(0, 0),
            S::Active,
            vec![app(1, false, true, false), req(0, 0, false)],
        ),
        (
            "npc retrying",
            "line ok goodbye",
            sp(0, 0),
            S::Closing,
            vec![app(1, false, true, false), req(0, 0, true)],
        ),
        (
            "npc retrying",
            "line bad",
            sp(0, 0),
            S::Active,
            vec![app(1, true, true, false), req(0, 0, false)],
        ),
        (
            "npc retrying",
            "line failed",
            sp(0, 0),
            S::Active,
            vec![app(1, true, true, false), req(0, 0, false)],
        ),
        (
            "npc retrying",
            "line cancelled",
            sp(0, 0),
            S::Active,
            vec![app(1, true, true, false), req(0, 0, false)],
        ),
        (
            "npc retrying",
            "player says",
            sp(1, 1),
            S::Active,
            vec![RejectPlayerLine],
        ),
        (
            "npc retrying",
            "npc 0 gone",
            sum(1),
            S::Summarizing,
            vec![CancelLine, Summarize { who: 1 }],
        ),
        (
            "npc retrying",
            "npc 1 gone",
            sum(1),
            S::Summarizing,
            vec![CancelLine, Summarize { who: 0 }],
        ),
        (
            "npc retrying",
            "tick late",
            sp(0, 0),
            S::Active,
            vec![CancelLine, app(1, true, true, false), req(0, 0, false)],
        ),
        // NPC conversation, the closing line in flight.
        (
            "npc closing",
            "line ok",
            sum(2),
            S::Summarizing,
            vec![
                app(1, false, false, true),
                Summarize { who: 0 },
                Summarize { who: 1 },
            ],
        ),
        (
            "npc closing",
            "line ok goodbye",
            sum(2),
            S::Summarizing,
            vec![
                app(1, false, false, true),
                Summarize { who: 0 },
                Summarize { who: 1 },
            ],
        ),
        (
            "npc closing",
            "line bad",
            sp(1, 1),
            S::Closing,
            vec![req(1, 1, true)],
        ),
        (
            "npc closing",
            "line failed",
            sp(1, 1),
            S::Closing,
            vec![req(1, 1, true)],
        ),
        (
            "npc closing",
            "line cancelled",
            sp(1, 1),
            S::Closing,
            vec![req(1, 1, true)],
        ),
        (
            "npc closing",
            "player says",
            sp(1, 0),
            S::Closing,
            vec![RejectPlayerLine],
        ),
        (
            "npc closing",
            "npc 0 gone",
            sum(1),
            S::Summarizing,
            vec![CancelLine, Summarize { who: 1 }],
        ),
        (
            "npc closing",
            "npc 1 gone",
            sum(1),
            S::Summarizing,
            vec![CancelLine, Summarize { who: 0 }],
        ),
        (
            "npc closing",
            "tick late",
            sp(1, 1),
            S::Closing,
            vec![CancelLine, req(1, 1, true)],
        ),
        // Player conversation, the NPC answering.
        (
            "player speaking",
            "line ok",
            Phase::AwaitingPlayer,
            S::AwaitingPlayer,
            vec![app(0, false, false, false)],
        ),
        (
            "player speaking",
            "line ok goodbye",
            Phase::AwaitingPlayer,
            S::AwaitingPlayer,
            vec![app(0, false, false, false)],
        ),
        (
            "player speaking",
            "line bad",
            sp(0, 1),
            S::Active,
            vec![req(0, 1, false)],
        ),
        (
            "player speaking",
            "line failed",
            sp(0, 1),
            S::Active,
            vec![req(0, 1, false)],
        ),
        (
            "player speaking",
            "line cancelled",
            sp(0, 1),
            S::Active,
            vec![req(0, 1, false)],
        ),
        (
            "player speaking",
            "player says",
            sp(0, 0),
            S::Active,
            vec![],
        ),
        (
            "player speaking",
            "player leaves",
            sum(1),
            S::Summarizing,
            vec![CancelLine, Summarize { who: 0 }],
        ),
        (
            "player speaking",
            "npc 0 gone",
            Phase::Ended,
            S::Ended,
            vec![CancelLine, End { unanswered: 1 }],
        ),
        (
            "player speaking",
            "tick late",
            sp(0, 1),
            S::Active,
            vec![CancelLine, req(0, 1, false)],
        ),
        // Player conversation, the NPC answering with a second player line held.
        (
            "player speaking, 1 held",
            "line ok",
            sp(0, 0),
            S::Active,
            vec![
                app(0, false, false, false),
                TakePlayerLines(1),
                req(0, 0, false),
            ],
        ),
        (
            "player speaking, 1 held",
            "line ok goodbye",
            sp(0, 0),
            S::Active,
            vec![
                app(0, false, false, false),
                TakePlayerLines(1),
                req(0, 0, false),
            ],
        ),
        (
            "player speaking, 1 held",
            "line bad",
            sp(0, 1),
            S::Active,
            vec![TakePlayerLines(1), req(0, 1, false)],
        ),
        (
            "player speaking, 1 held",
            "line failed",
            sp(0, 1),
            S::Active,
            vec![TakePlayerLines(1), req(0, 1, false)],
        ),
        (
            "player speaking, 1 held",
            "line cancelled",
            sp(0, 1),
            S::Active,
            vec![TakePlayerLines(1), req(0, 1, false)],
        ),
        (
            "player speaking, 1 held",
            "player says",
            sp(0, 0),
            S::Active,
            vec![],
        ),
        (
            "player speaking, 1 held",
            "player leaves",
            sum(1),
            S::Summarizing,
            vec![CancelLine, TakePlayerLines(1), Summarize { who: 0 }],
        ),
        (
            "player speaking, 1 held",
            "npc 0 gone",
            Phase::Ended,
            S::Ended,
            vec![CancelLine, TakePlayerLines(1), End { unanswered: 2 }],
        ),
        (
            "player speaking, 1 held",
            "tick late",
            sp(0, 1),
            S::Active,
            vec![CancelLine, TakePlayerLines(1), req(0, 1, false)],
        ),
        // Player conversation, the player's turn.
        (
            "awaiting player",
            "player says",
            sp(0, 0),
            S::Active,
            vec![TakePlayerLines(1), req(0, 0, false)],
        ),
        (
            "awaiting player",
            "player leaves",
            sum(1),
            S::Summarizing,
            vec![Summarize { who: 0 }],
        ),
        (
            "awaiting player",
            "npc 0 gone",
            Phase::Ended,
            S::Ended,
            vec![End { unanswered: 0 }],
        ),
        (
            "awaiting player",
            "tick late",
            sum(1),
            S::Summarizing,
            vec![Summarize { who: 0 }],
        ),
        // Memories being written.
        (
            "summarizing 2",
            "summary done",
            sum(1),
            S::Summarizing,
            vec![],
        ),
        (
            "summarizing 2",
            "player says",
            sum(2),
            S::Summarizing,
            vec![RejectPlayerLine],
        ),
        (
            "summarizing 2",
            "tick late",
            Phase::Ended,
            S::Ended,
            vec![CancelSummaries, End { unanswered: 0 }],
        ),
        (
            "summarizing 1",
            "summary done",
            Phase::Ended,
            S::Ended,
            vec![End { unanswered: 0 }],
        ),
        (
            "summarizing 1",
            "player says",
            sum(1),
            S::Summarizing,
            vec![RejectPlayerLine],
        ),
        (
            "summarizing 1",
            "tick late",
            Phase::Ended,
            S::Ended,
            vec![CancelSummaries, End { unanswered: 0 }],
        ),
    ]
}

#[test]
fn every_state_event_pair_matches_the_table() {
    let table = table();
    for (row_state, row_event, ..) in &table {
        assert!(
            states().iter().any(|(n, _)| n == row_state),
            "unknown state {row_state}"
        );
        assert!(
            events().iter().any(|(n, ..)| n == row_event),
            "unknown event {row_event}"
        );
    }
    let mut pairs = 0;
    for (sname, state) in states() {
        for (ename, event, now) in events() {
            pairs += 1;
            let mut m = state.clone();
            let got = m.handle(event, now, &T);
            let row = table.iter().find(|(s, e, ..)| *s == sname && *e == ename);
            match row {
                Some((_, _, phase, public, cmds)) => {
                    assert_eq!(&got, cmds, "({sname}, {ename}) commands");
                    assert_eq!(m.phase, *phase, "({sname}, {ename}) phase");
                    assert_eq!(m.public_state(), *public, "({sname}, {ename}) state");
                }
                None => {
                    // Everything else is a no-op: stale engine events, a
                    // player leaving an NPC-only talk, time-outs not due,
                    // events after the end.
                    assert!(
                        got.is_empty(),
                        "({sname}, {ename}) should do nothing: {got:?}"
                    );
                    let mut unchanged = state.clone();
                    unchanged.gone = m.gone.clone();
                    assert_eq!(m, unchanged, "({sname}, {ename}) should change nothing");
                }
            }
        }
    }
    assert_eq!(pairs, states().len() * events().len());
}

#[test]
fn begin_starts_resumes_and_waits() {
    // A new NPC conversation: the first speaker greets.
    let mut m = Machine::new(2, false, 8, ConversationState::Active, 0, 0, 0, NOW);
    assert_eq!(m.handle(Event::Begin, NOW, &T), vec![req(0, 0, false)]);
    // A new player conversation waits for the player's first line.
    let mut m = Machine::new(1, true, 8, ConversationState::AwaitingPlayer, 1, 0, 0, NOW);
    assert!(m.handle(Event::Begin, NOW, &T).is_empty());
    assert_eq!(m.public_state(), ConversationState::AwaitingPlayer);
    // Restored mid-way: closing resumes the closing line; summarizing writes memories.
    let mut m = Machine::new(2, false, 8, ConversationState::Closing, 1, 7, 7, NOW);
    assert_eq!(m.handle(Event::Begin, NOW, &T), vec![req(1, 0, true)]);
    let mut m = Machine::new(2, false, 8, ConversationState::Summarizing, 0, 8, 8, NOW);
    assert_eq!(
        m.handle(Event::Begin, NOW, &T),
        vec![Summarize { who: 0 }, Summarize { who: 1 }]
    );
    // Nothing said: nothing to remember, the end comes at once.
    let mut m = Machine::new(1, true, 8, ConversationState::AwaitingPlayer, 1, 0, 0, NOW);
    assert_eq!(
        m.handle(Event::PlayerLeaves, NOW, &T),
        vec![End { unanswered: 0 }]
    );
}

// ---------------------------------------------------------------------------
// Properties: a model of the glue receives the commands and checks them.
// ---------------------------------------------------------------------------

/// What the Bevy systems hold for one conversation.
#[derive(Debug, Default)]
struct Glue {
    /// Player lines said and held, oldest first (ids).
    held: Vec<u32>,
    /// Transcript: Some(id) for a player line, None for an NPC line.
    transcript: Vec<Option<u32>>,
    /// The line request in flight.
    line: Option<usize>,
    /// Summary requests in flight (NPC index).
    summaries: Vec<usize>,
    said: u32,
    rejected: u32,
    ended: Option<usize>,
    gone: Vec<bool>,
    /// The player left (a player conversation): no line may be asked for.
    left: bool,
}

impl Glue {
    /// Carry out commands, checking each one is legal.
    fn apply(&mut self, m: &Machine, cmds: &[Command]) -> Result<(), TestCaseError> {
        for c in cmds {
            prop_assert!(self.ended.is_none(), "{c:?} after the end");
            match *c {
                RequestLine { speaker, .. } => {
                    prop_assert!(self.line.is_none(), "two lines in flight");
                    prop_assert!(!self.left, "a line asked for after the player left");
                    prop_assert!(
                        speaker < m.n_npcs && !self.gone[speaker],
                        "request for a gone NPC"
                    );
                    self.line = Some(speaker);
                }
                CancelLine => {
                    prop_assert!(self.line.take().is_some(), "cancel with nothing in flight");
                }
                AppendLine { .. } => {
                    prop_assert!(self.line.is_none(), "append while the request is live");
                    self.transcript.push(None);
                }
                TakePlayerLines(n) => {
                    prop_assert!(
                        n >= 1 && n <= self.held.len(),
                        "take {n} of {}",
                        self.held.len()
                    );
                    for id in self.held.drain(..n) {
                        self.transcript.push(Some(id));
                    }
                }
                RejectPlayerLine => {
                    prop_assert!(self.held.pop().is_some());
                    self.rejected += 1;
                }
                Summarize { who } => {
                    prop_assert!(!self.gone[who], "summary for a gone NPC");
                    prop_assert!(!self.summaries.contains(&who), "two summaries for one NPC");
                    self.summaries.push(who);
                }
                CancelSummaries => self.summaries.clear(),
                End { unanswered } => {
                    prop_assert!(self.line.is_none(), "ended with a line in flight");
                    prop_assert!(self.summaries.is_empty(), "ended with summaries running");
                    prop_assert!(self.held.is_empty(), "ended with held player lines");
                    // The unanswered ones are exactly the player lines after the last NPC line.
                    let tail = self
                        .transcript
                        .iter()
                        .rev()
                        .take_while(|l| l.is_some())
                        .count();
                    prop_assert_eq!(unanswered, tail);
                    self.ended = Some(unanswered);
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// An engine outcome for the line in flight (only routed when there is one).
    Line(u8),
    Summary,
    Says,
    Leaves,
    Gone(usize),
    /// Seconds pass.
    Wait(u16),
    /// A stale engine event (a request no longer tracked): routed anyway.
    Stale(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..5).prop_map(Step::Line),
        2 => Just(Step::Summary),
        3 => Just(Step::Says),
        1 => Just(Step::Leaves),
        1 => (0usize..4).prop_map(Step::Gone),
        2 => (0u16..400).prop_map(Step::Wait),
        1 => (0u8..5).prop_map(Step::Stale),
    ]
}

fn line_event(k: u8) -> Event {
    match k {
        0 => Event::LineDone {
            usable: true,
            goodbye: false,
        },
        1 => Event::LineDone {
            usable: true,
            goodbye: true,
        },
        2 => Event::LineDone {
            usable: false,
            goodbye: false,
        },
        3 => Event::LineFailed,
        _ => Event::LineCancelled,
    }
}

/// A conversation: (n_npcs, with_player, max_lines).
fn conversation() -> impl Strategy<Value = (usize, bool, usize)> {
    prop_oneof![
        (2usize..5, Just(false), 1usize..10),
        (Just(1usize), Just(true), 1usize..10),
    ]
}

/// Feed one step through the glue model; returns false once ended.
fn feed(m: &mut Machine, g: &mut Glue, now: &mut f64, s: &Step) -> Result<(), TestCaseError> {
    let event = match *s {
        Step::Line(k) => {
            if g.line.take().is_none() {
                return Ok(());
            }
            line_event(k)
        }
        Step::Summary => {
            if g.summaries.pop().is_none() {
                return Ok(());
            }
            Event::SummaryDone
        }
        Step::Says => {
            if !m.with_player || g.ended.is_some() {
                // The glue starts a new conversation instead; not this machine's.
                return Ok(());
            }
            g.said += 1;
            g.held.push(g.said);
            Event::PlayerSays
        }
        Step::Leaves => {
            if m.with_player {
                g.left = true;
            }
            Event::PlayerLeaves
        }
        Step::Gone(i) => {
            if i >= g.gone.len() || g.gone[i] {
                return Ok(());
            }
            g.gone[i] = true;
            // The glue drops a gone NPC's summary request (its result is ignored).
            Event::NpcGone(i)
        }
        Step::Wait(dt) => {
            *now += f64::from(dt);
            Event::Tick
        }
        Step::Stale(k) => {
            if g.line.is_some() {
                return Ok(());
            }
            let before = m.clone();
            let cmds = m.handle(line_event(k), *now, &T);
            prop_assert!(cmds.is_empty(), "stale event acted: {cmds:?}");
            prop_assert_eq!(&before, &*m);
            return Ok(());
        }
    };
    let cmds = m.handle(event, *now, &T);
    g.apply(m, &cmds)?;
    // The public state agrees with what is in flight.
    match m.phase {
        Phase::Speaking { .. } => prop_assert!(g.line.is_some()),
        Phase::Summarizing { left } => prop_assert_eq!(left, g.summaries.len()),
        Phase::AwaitingPlayer => prop_assert!(g.line.is_none() && g.held.is_empty()),
        Phase::Ended => prop_assert!(g.ended.is_some()),
    }
    Ok(())
}

fn start(n: usize, with_player: bool, max_lines: usize) -> (Machine, Glue) {
    let state = if with_player {
        ConversationState::AwaitingPlayer
    } else {
        ConversationState::Active
    };
    let next = if with_player { 1 } else { 0 };
    let mut m = Machine::new(n, with_player, max_lines, state, next, 0, 0, 0.0);
    let mut g = Glue {
        gone: vec![false; n],
        ..Default::default()
    };
    let cmds = m.handle(Event::Begin, 0.0, &T);
    g.apply(&m, &cmds).unwrap();
    (m, g)
}

/// After any history, once the player leaves and the engine answers
/// everything, the conversation ends within a bounded number of steps —
/// without waiting for a time-out: something is always in flight until the end.
fn drain(
    m: &mut Machine,
    g: &mut Glue,
    now: &mut f64,
    max_lines: usize,
) -> Result<usize, TestCaseError> {
    feed(m, g, now, &Step::Leaves)?;
    let bound = 2 * max_lines + 8;
    for i in 0..bound {
        if g.ended.is_some() {
            return Ok(i);
        }
        let s = if g.line.is_some() {
            Step::Line(0)
        } else if !g.summaries.is_empty() {
            Step::Summary
        } else {
            prop_assert!(false, "stuck: nothing in flight, not ended: {m:?}");
            unreachable!()
        };
        feed(m, g, now, &s)?;
    }
    prop_assert!(g.ended.is_some(), "not ended after {bound} steps: {m:?}");
    Ok(bound)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Every command is legal for the glue, the end comes once with nothing
    /// in flight, and every player line is answered, reported unanswered or
    /// rejected — none is lost.
    #[test]
    fn random_histories_keep_every_invariant(
        (n, with_player, max_lines) in conversation(),
        steps in proptest::collection::vec(step(), 0..80),
    ) {
        let (mut m, mut g) = start(n, with_player, max_lines);
        let mut now = 0.0;
        for s in &steps {
            feed(&mut m, &mut g, &mut now, s)?;
        }
        drain(&mut m, &mut g, &mut now, max_lines)?;
        // Nothing lost: said = answered + unanswered + rejected.
        let answered = {
            let mut answered = 0;
            let mut pending = 0;
            for l in &g.transcript {
                match l {
                    Some(_) => pending += 1,
                    None => { answered += pending; pending = 0; }
                }
            }
            answered
        };
        let unanswered = g.ended.unwrap_or(0) as u32;
        prop_assert_eq!(g.said, answered + unanswered + g.rejected);
        // Every said line is in the transcript or was rejected, in order.
        let in_transcript: Vec<u32> = g.transcript.iter().flatten().copied().collect();
        prop_assert_eq!(in_transcript.len() as u32 + g.rejected, g.said);
        prop_assert!(in_transcript.windows(2).all(|w| w[0] < w[1]));
        // Nothing happens after the end.
        let mut after = m.clone();
        for s in &steps {
            feed(&mut after, &mut g, &mut now, s)?;
        }
    }

    /// With no engine answers at all (a stalled engine), time alone ends
    /// every conversation: each state's time-out leads out of it.
    #[test]
    fn time_alone_ends_every_conversation(
        (n, with_player, max_lines) in conversation(),
        prefix in proptest::collection::vec(step(), 0..30),
    ) {
        let (mut m, mut g) = start(n, with_player, max_lines);
        let mut now = 0.0;
        for s in &prefix {
            feed(&mut m, &mut g, &mut now, s)?;
        }
        let bound = 2 * max_lines + 4;
        for _ in 0..bound {
            if g.ended.is_some() { break; }
            feed(&mut m, &mut g, &mut now, &Step::Wait(400))?;
        }
        prop_assert!(g.ended.is_some(), "still {:?} after {bound} time-outs", m.phase);
    }

    /// An NPC conversation the engine serves well ends by itself after at most
    /// max_lines lines, each speaker in turn.
    #[test]
    fn npc_conversations_end_by_their_limit(
        n in 2usize..5,
        max_lines in 1usize..12,
        goodbyes in proptest::collection::vec(any::<bool>(), 12),
    ) {
        let (mut m, mut g) = start(n, false, max_lines);
        let mut now = 0.0;
        let mut speakers = Vec::new();
        for i in 0..(max_lines + n + 2) {
            if g.ended.is_some() { break; }
            if let Some(s) = g.line { speakers.push(s); }
            let s = if g.line.is_some() {
                Step::Line(if goodbyes[i % goodbyes.len()] { 1 } else { 0 })
            } else {
                Step::Summary
            };
            feed(&mut m, &mut g, &mut now, &s)?;
        }
        prop_assert!(g.ended.is_some());
        let lines = g.transcript.len();
        prop_assert!(lines >= 1 && lines <= max_lines);
        for (i, s) in speakers.iter().enumerate() {
            prop_assert_eq!(*s, i % n);
        }
    }
}
