//! Counting a bison herd from camera-trap sightings.
//!
//! Each sighting says which animals a camera saw and when; an animal counts once
//! however often it walks past, and the herd size per month is the number of
//! distinct animals seen in that month.

use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone)]
pub struct Sighting {
    pub month: u32,
    pub camera: String,
    pub animals: Vec<String>,
}

/// Distinct animals per month, in month order.
pub fn herd_size(sightings: &[Sighting]) -> BTreeMap<u32, usize> {
    let mut seen: BTreeMap<u32, HashSet<&str>> = BTreeMap::new();
    for s in sightings {
        let month = seen.entry(s.month).or_default();
        for a in &s.animals {
            month.insert(a.as_str());
        }
    }
    seen.into_iter().map(|(m, set)| (m, set.len())).collect()
}

/// The camera that saw the most distinct animals, if any camera saw one.
pub fn busiest_camera(sightings: &[Sighting]) -> Option<(String, usize)> {
    let mut per_camera: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for s in sightings {
        per_camera
            .entry(s.camera.as_str())
            .or_default()
            .extend(s.animals.iter().map(String::as_str));
    }
    per_camera
        .into_iter()
        .map(|(c, set)| (c.to_string(), set.len()))
        .max_by_key(|(_, n)| *n)
        .filter(|(_, n)| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(month: u32, camera: &str, animals: &[&str]) -> Sighting {
        Sighting { month, camera: camera.into(), animals: animals.iter().map(|a| a.to_string()).collect() }
    }

    #[test]
    fn counts_each_animal_once_per_month() {
        let data = vec![
            s(5, "north", &["Pumpen", "Puszcza"]),
            s(5, "south", &["Pumpen"]),
            s(6, "north", &["Pulpa"]),
        ];
        let sizes = herd_size(&data);
        assert_eq!(sizes[&5], 2);
        assert_eq!(sizes[&6], 1);
        assert_eq!(busiest_camera(&data), Some(("north".to_string(), 3)));
    }
}
