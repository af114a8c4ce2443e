//! Token tags on three axes — semantic role, modality and recency — and their compact ids.
//! Every KV-cache token carries a [`TokenTag`]; its [`Tag`] (with recency resolved) picks its precision.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a token is for in the conversation (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// System prompt and rendered tool schemas.
    System,
    User,
    /// `<think>` content or a message's `reasoning` field.
    Reasoning,
    ToolCall,
    /// Tool results (and, for text-only models, image alt text).
    Observation,
    /// Final answer text of the assistant.
    Assistant,
    /// Special and formatting tokens of the chat template.
    Template,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::System,
        Role::User,
        Role::Reasoning,
        Role::ToolCall,
        Role::Observation,
        Role::Assistant,
        Role::Template,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Reasoning => "reasoning",
            Role::ToolCall => "tool_call",
            Role::Observation => "observation",
            Role::Assistant => "assistant",
            Role::Template => "template",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Text,
    Image,
}

impl Modality {
    pub const ALL: [Modality; 2] = [Modality::Text, Modality::Image];

    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Image => "image",
        }
    }

    pub fn parse(s: &str) -> Option<Modality> {
        Modality::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// How far back a token is, in units (turns or steps) from the unit being generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recency {
    Current,
    Previous,
    TwoBack,
    Older,
}

impl Recency {
    pub const ALL: [Recency; 4] = [
        Recency::Current,
        Recency::Previous,
        Recency::TwoBack,
        Recency::Older,
    ];

    /// Bucket a distance in units: 0 is the unit being generated.
    pub fn from_distance(units_back: u32) -> Recency {
        match units_back {
            0 => Recency::Current,
            1 => Recency::Previous,
            2 => Recency::TwoBack,
            _ => Recency::Older,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Recency::Current => "current",
            Recency::Previous => "previous",
            Recency::TwoBack => "two_back",
            Recency::Older => "older",
        }
    }

    pub fn parse(s: &str) -> Option<Recency> {
        Recency::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Which unit recency counts in: a user turn (user message to user message, as in the
/// reference paper) or an agent step (assistant message to assistant message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecencyUnit {
    #[default]
    Turn,
    Step,
}

/// The tag a token carries when it is written: role, modality and the turn/step it
/// belongs to. Recency is not stored: it depends on where generation currently is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenTag {
    pub role: Role,
    pub modality: Modality,
    /// Index of the user turn this token belongs to (0 = before the first user message).
    pub turn: u32,
    /// Index of the agent step this token belongs to (0 = before the first assistant message).
    pub step: u32,
}

impl TokenTag {
    /// A text token of `role` in turn `turn` (its agent step numbered alike): tests' shorthand.
    #[cfg(test)]
    pub(crate) fn text(role: Role, turn: u32) -> Self {
        TokenTag {
            role,
            modality: Modality::Text,
            turn,
            step: turn,
        }
    }

    /// Resolve recency relative to the unit now being generated.
    pub fn at(&self, unit: RecencyUnit, now_turn: u32, now_step: u32) -> Tag {
        let back = match unit {
            RecencyUnit::Turn => now_turn.saturating_sub(self.turn),
            RecencyUnit::Step => now_step.saturating_sub(self.step),
        };
        Tag {
            role: self.role,
            modality: self.modality,
            recency: Recency::from_distance(back),
        }
    }
}

/// A fully resolved tag: one of 7 x 2 x 4 = 56.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tag {
    pub recency: Recency,
    pub modality: Modality,
    pub role: Role,
}

/// Number of distinct [`Tag`]s.
pub const NUM_TAGS: usize = 7 * 2 * 4;

/// Compact tag id in `0..NUM_TAGS`, dense so tables can be indexed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TagId(pub u8);

impl Tag {
    pub fn id(self) -> TagId {
        let r = self.role as u8;
        let m = self.modality as u8;
        let a = self.recency as u8;
        TagId((r * 2 + m) * 4 + a)
    }

    pub fn from_id(id: TagId) -> Option<Tag> {
        let i = id.0 as usize;
        if i >= NUM_TAGS {
            return None;
        }
        Some(Tag {
            role: Role::ALL[i / 8],
            modality: Modality::ALL[(i / 4) % 2],
            recency: Recency::ALL[i % 4],
        })
    }

    pub fn all() -> impl Iterator<Item = Tag> {
        (0..NUM_TAGS as u8).filter_map(|i| Tag::from_id(TagId(i)))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.role.as_str(),
            self.modality.as_str(),
            self.recency.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_ids_are_dense_and_round_trip() {
        let mut seen = [false; NUM_TAGS];
        for tag in Tag::all() {
            let id = tag.id();
            assert!(!seen[id.0 as usize], "duplicate id for {tag}");
            seen[id.0 as usize] = true;
            assert_eq!(Tag::from_id(id), Some(tag));
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(Tag::from_id(TagId(NUM_TAGS as u8)), None);
    }

    #[test]
    fn recency_resolves_per_unit() {
        let t = TokenTag {
            role: Role::Observation,
            modality: Modality::Text,
            turn: 1,
            step: 3,
        };
        assert_eq!(t.at(RecencyUnit::Turn, 1, 9).recency, Recency::Current);
        assert_eq!(t.at(RecencyUnit::Step, 1, 4).recency, Recency::Previous);
        assert_eq!(t.at(RecencyUnit::Step, 1, 5).recency, Recency::TwoBack);
        assert_eq!(t.at(RecencyUnit::Turn, 7, 5).recency, Recency::Older);
    }

    #[test]
    fn names_parse_back() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        for r in Recency::ALL {
            assert_eq!(Recency::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("tool"), None);
    }
}
