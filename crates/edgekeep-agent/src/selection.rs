//! Classification of the state folder's paths: carried by a backup, kept
//! from the current state on restore, or dropped.

use globset::GlobSet;

use crate::config::AgentConfig;
use crate::error::Result;

/// Suffixes of the files SQLite keeps beside a database while it is open.
pub(crate) const SQLITE_SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Class of a path of the state folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Carried by the backup; for a folder, its children may still be
    /// excluded, so walks descend into it.
    Backed,
    /// A configured SQLite database: backed up through a snapshot.
    Database,
    /// A folder outside the include paths that contains one of them or a
    /// configured database.
    Ancestor,
    /// Outside the include paths or excluded: left out of the backup and kept
    /// from the current state on restore, with everything below it.
    Kept,
    /// A side file of a configured database: neither backed up nor kept.
    Dropped,
}

/// The compiled include, exclude and database rules of a config.
pub(crate) struct Selection {
    include: Option<Vec<String>>,
    exclude: GlobSet,
    databases: Vec<String>,
}

impl Selection {
    pub(crate) fn new(config: &AgentConfig) -> Result<Self> {
        Ok(Selection {
            include: config.include.clone(),
            exclude: config.exclude_set()?,
            databases: config.sqlite.iter().map(|db| db.path.clone()).collect(),
        })
    }

    /// Classifies `path`, relative to the state folder with `/` separators.
    /// The caller classifies parents first and does not ask about paths
    /// below a [`Class::Kept`] or [`Class::Dropped`] one.
    pub(crate) fn classify(&self, path: &str) -> Class {
        if self.is_database_side_file(path) {
            return Class::Dropped;
        }
        if self.exclude.is_match(path) {
            return Class::Kept;
        }
        if self.databases.iter().any(|db| db == path) {
            return Class::Database;
        }
        let Some(include) = &self.include else {
            return Class::Backed;
        };
        if include.iter().any(|inc| is_within(path, inc)) {
            Class::Backed
        } else if include
            .iter()
            .chain(&self.databases)
            .any(|inner| is_within(inner, path))
        {
            Class::Ancestor
        } else {
            Class::Kept
        }
    }

    pub(crate) fn is_database_side_file(&self, path: &str) -> bool {
        self.databases.iter().any(|db| {
            SQLITE_SIDE_FILES
                .iter()
                .any(|suffix| path.strip_suffix(suffix) == Some(db.as_str()))
        })
    }

    pub(crate) fn include_paths(&self) -> Option<&[String]> {
        self.include.as_deref()
    }

    pub(crate) fn databases(&self) -> &[String] {
        &self.databases
    }
}

/// True when `path` is `base` or lies below it.
pub(crate) fn is_within(path: &str, base: &str) -> bool {
    path == base
        || path
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(text: &str) -> Selection {
        Selection::new(&AgentConfig::parse(text).unwrap()).unwrap()
    }

    #[test]
    fn classify_follows_include_exclude_and_databases() {
        let rules = selection(
            r#"
            include = ["config", "data/historian.db", "identity"]
            exclude = ["**/*.tmp", "config/cache"]
            [[sqlite]]
            path = "data/historian.db"
            "#,
        );
        assert_eq!(rules.classify("config"), Class::Backed);
        assert_eq!(rules.classify("config/a.json"), Class::Backed);
        assert_eq!(rules.classify("config/b.tmp"), Class::Kept);
        assert_eq!(rules.classify("config/sub/b.tmp"), Class::Kept);
        assert_eq!(rules.classify("config/cache"), Class::Kept);
        assert_eq!(rules.classify("configx"), Class::Kept);
        assert_eq!(rules.classify("data"), Class::Ancestor);
        assert_eq!(rules.classify("data/historian.db"), Class::Database);
        assert_eq!(rules.classify("data/historian.db-wal"), Class::Dropped);
        assert_eq!(rules.classify("data/historian.db-shm"), Class::Dropped);
        assert_eq!(rules.classify("data/other.db"), Class::Kept);
        assert_eq!(rules.classify("logs"), Class::Kept);
    }

    #[test]
    fn classify_without_include_backs_up_everything() {
        let rules = selection("exclude = [\"logs/**\"]");
        assert_eq!(rules.classify("anything/at/all"), Class::Backed);
        assert_eq!(rules.classify("logs"), Class::Backed);
        assert_eq!(rules.classify("logs/today.log"), Class::Kept);
    }
}
