//! A serving workload replayed from recorded agent trajectories: each trajectory becomes a
//! multi-turn session whose turn `k` sends everything up to the `k`-th assistant message's
//! body and generates that body's length (capped). The tokens and tags come from rendering the
//! trajectory with a model's chat template, so prompt lengths, tag mix and turn structure
//! are the recorded ones. Written once with a tokenizer (`triaxkv bench serve-workload`) and
//! replayed on the GPU machine by `triaxkv bench serve`.

use crate::model::tokenizer::Tokenizer;
use crate::tags::{Modality, Role, TokenTag};
use crate::trace::read::TraceFile;
use crate::trace::render::{render, RenderOptions};
use crate::trace::template::ChatTemplate;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const SCHEMA: &str = "triaxkv.serve-workload/v1";

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a serve workload: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("{}: session {session} ({id}): {msg}", path.display())]
    Session {
        path: PathBuf,
        session: usize,
        id: String,
        msg: String,
    },
    #[error("trajectory {id} ({file}): {msg}")]
    Render {
        id: String,
        file: String,
        msg: String,
    },
    #[error("no trajectory has an assistant message within {0} tokens")]
    Empty(usize),
}

/// One generation turn: the prompt is every token before `start`; the reply is the `gen`
/// tokens from `start` (the recorded assistant body, capped), teacher-forced into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub start: usize,
    pub gen: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub file: String,
    pub ids: Vec<u32>,
    /// Per token: index into `Role::ALL`, `Modality::ALL`, and the turn / step.
    pub role: Vec<u8>,
    pub modality: Vec<u8>,
    pub turn: Vec<u32>,
    pub step: Vec<u32>,
    pub turns: Vec<Turn>,
}

impl Session {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Tags of tokens `range` (checked by `Workload::read`).
    pub fn tags(&self, range: std::ops::Range<usize>) -> Vec<TokenTag> {
        range
            .map(|i| TokenTag {
                role: Role::ALL[self.role[i] as usize % Role::ALL.len()],
                modality: Modality::ALL[self.modality[i] as usize % Modality::ALL.len()],
                turn: self.turn[i],
                step: self.step[i],
            })
            .collect()
    }

    fn check(&self) -> Result<(), String> {
        let n = self.ids.len();
        for (name, len) in [
            ("role", self.role.len()),
            ("modality", self.modality.len()),
            ("turn", self.turn.len()),
            ("step", self.step.len()),
        ] {
            if len != n {
                return Err(format!("{name} has {len} entries for {n} tokens"));
            }
        }
        if let Some(i) = self
            .role
            .iter()
            .position(|&r| r as usize >= Role::ALL.len())
        {
            return Err(format!("role index {} at token {i}", self.role[i]));
        }
        if let Some(i) = self
            .modality
            .iter()
            .position(|&m| m as usize >= Modality::ALL.len())
        {
            return Err(format!("modality index {} at token {i}", self.modality[i]));
        }
        if self.turns.is_empty() {
            return Err("no turns".into());
        }
        let mut end = 0;
        for (k, t) in self.turns.iter().enumerate() {
            if t.start < end.max(1) || t.gen == 0 || t.start + t.gen > n {
                return Err(format!(
                    "turn {k}: tokens {}..{} after {end} in a session of {n}",
                    t.start,
                    t.start + t.gen
                ));
            }
            end = t.start + t.gen;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub schema: String,
    /// What rendered the traces (the tokenizer's model file).
    pub tokenizer: String,
    pub max_context: usize,
    pub max_gen: usize,
    pub sessions: Vec<Session>,
}

impl Workload {
    /// Render every trajectory of `files` into a session of at most `max_context` tokens
    /// (turns whose reply would cross it are dropped); replies capped at `max_gen`.
    pub fn build(
        files: &[TraceFile],
        template: &ChatTemplate,
        tok: &Tokenizer,
        tokenizer: &str,
        max_context: usize,
        max_gen: usize,
    ) -> Result<Workload, WorkloadError> {
        let mut sessions = Vec::new();
        for f in files {
            for traj in &f.trajectories {
                let file = f.path.display().to_string();
                let r = render(traj, template, tok, &RenderOptions::default()).map_err(|e| {
                    WorkloadError::Render {
                        id: traj.id.clone(),
                        file: file.clone(),
                        msg: e.to_string(),
                    }
                })?;
                let mut turns = Vec::new();
                for body in r.assistant_bodies() {
                    let gen = body.len().min(max_gen.max(1));
                    if body.start == 0 || gen == 0 || body.start + gen > max_context {
                        break;
                    }
                    turns.push(Turn {
                        start: body.start,
                        gen,
                    });
                }
                let Some(last) = turns.last() else { continue };
                let n = last.start + last.gen;
                let tags = &r.tags[..n];
                sessions.push(Session {
                    id: traj.id.clone(),
                    file,
                    ids: r.ids[..n].to_vec(),
                    role: tags.iter().map(|t| t.role as u8).collect(),
                    modality: tags.iter().map(|t| t.modality as u8).collect(),
                    turn: tags.iter().map(|t| t.turn).collect(),
                    step: tags.iter().map(|t| t.step).collect(),
                    turns,
                });
            }
        }
        if sessions.is_empty() {
            return Err(WorkloadError::Empty(max_context));
        }
        Ok(Workload {
            schema: SCHEMA.into(),
            tokenizer: tokenizer.into(),
            max_context,
            max_gen,
            sessions,
        })
    }

    pub fn read(path: &Path) -> Result<Workload, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
            path: path.into(),
            source,
        })?;
        let w: Workload = serde_json::from_str(&text).map_err(|e| WorkloadError::Parse {
            path: path.into(),
            msg: e.to_string(),
        })?;
        if w.schema != SCHEMA {
            return Err(WorkloadError::Parse {
                path: path.into(),
                msg: format!("schema {:?}, expected {SCHEMA:?}", w.schema),
            });
        }
        if w.sessions.is_empty() {
            return Err(WorkloadError::Parse {
                path: path.into(),
                msg: "no sessions".into(),
            });
        }
        for (i, s) in w.sessions.iter().enumerate() {
            s.check().map_err(|msg| WorkloadError::Session {
                path: path.into(),
                session: i,
                id: s.id.clone(),
                msg,
            })?;
        }
        Ok(w)
    }

    pub fn write(&self, path: &Path) -> Result<(), WorkloadError> {
        crate::util::write_atomic(path, |w| {
            serde_json::to_writer(&mut *w, self).map_err(std::io::Error::other)
        })
        .map_err(|source| WorkloadError::Io {
            path: path.into(),
            source,
        })
    }

    /// Tokens over all sessions, and generated tokens over all turns.
    pub fn totals(&self) -> (usize, usize) {
        let tokens = self.sessions.iter().map(|s| s.len()).sum();
        let gen = self
            .sessions
            .iter()
            .flat_map(|s| &s.turns)
            .map(|t| t.gen)
            .sum();
        (tokens, gen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            id: "t".into(),
            file: "f".into(),
            ids: vec![1; 10],
            role: vec![0; 10],
            modality: vec![0; 10],
            turn: vec![1; 10],
            step: vec![0; 10],
            turns: vec![Turn { start: 4, gen: 2 }, Turn { start: 8, gen: 2 }],
        }
    }

    #[test]
    fn bad_sessions_are_refused_naming_the_field() {
        assert_eq!(session().check(), Ok(()));
        let mut s = session();
        s.role.pop();
        assert!(s.check().unwrap_err().contains("role has 9"));
        let mut s = session();
        s.turns[1].start = 5;
        assert!(s.check().unwrap_err().contains("turn 1"));
        let mut s = session();
        s.modality[3] = 7;
        assert!(s
            .check()
            .unwrap_err()
            .contains("modality index 7 at token 3"));
        let mut s = session();
        s.turns[1].gen = 3;
        assert!(s.check().is_err());
    }
}
