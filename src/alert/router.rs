//! Routing: which channels a notification goes to, from the `[[route]]` tables.
//!
//! Invariant: without routes every channel gets every notification; with routes, a notification
//! goes to the union of the channels of every route that matches it, each channel once, in the
//! order the routes name them.

use super::{AlertsConfig, RouteConfig, Severity};

/// Which channels (by index in the config) a notification goes to.
pub(super) struct Router {
    routes: Vec<(RouteConfig, Vec<usize>)>,
    all: Vec<usize>,
}

impl Router {
    /// Resolves the routes' channel names to indexes (validation made sure they exist).
    pub(super) fn new(config: &AlertsConfig) -> Self {
        let index = |name: &String| config.channels.iter().position(|c| c.name() == name);
        let routes = config
            .routes
            .iter()
            .map(|r| (r.clone(), r.channels.iter().filter_map(index).collect()))
            .collect();
        Self {
            routes,
            all: (0..config.channels.len()).collect(),
        }
    }

    /// The channels a notification about `credential` at `severity` goes to.
    pub(super) fn channels_for(&self, credential: &str, severity: Severity) -> Vec<usize> {
        if self.routes.is_empty() {
            return self.all.clone();
        }
        let mut out: Vec<usize> = Vec::new();
        for (route, channels) in &self.routes {
            if route.matches(credential, severity) {
                for &c in channels {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_the_union_of_matching_routes() {
        let config: AlertsConfig = toml::from_str(
            r#"
            [[channel]]
            name = "a"
            kind = "webhook"
            url = "https://a.example"
            [[channel]]
            name = "b"
            kind = "webhook"
            url = "https://b.example"
            [[route]]
            severity = "critical"
            channels = ["a", "b"]
            [[route]]
            credentials = ["db"]
            channels = ["a"]
            "#,
        )
        .unwrap();
        let router = Router::new(&config);
        assert_eq!(router.channels_for("db", Severity::Critical), [0, 1]);
        assert_eq!(router.channels_for("db", Severity::Warning), [0]);
        assert!(router.channels_for("other", Severity::Warning).is_empty());
        let no_routes = AlertsConfig {
            routes: vec![],
            ..config
        };
        assert_eq!(
            Router::new(&no_routes).channels_for("x", Severity::Warning),
            [0, 1]
        );
    }
}
