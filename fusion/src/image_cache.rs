//! The few most recent encoded images, so that another question about the same image does
//! not run the encoder again ([`crate::vlm::Vlm`] keeps one, whatever its configuration).
//!
//! An entry is keyed by a hash of the image's size and pixels plus whatever else changes the
//! encoding (the image-token budget); the oldest entry goes when the cache is full. It is
//! behind a mutex, so one loaded model serves several threads.

use image::RgbImage;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// Encoded images a pipeline keeps for re-use.
pub const IMAGE_CACHE_ENTRIES: usize = 8;

/// The cache key of `img` encoded with the settings `extra`.
pub fn image_key(img: &RgbImage, extra: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    img.dimensions().hash(&mut h);
    img.as_raw().hash(&mut h);
    extra.hash(&mut h);
    h.finish()
}

/// A bounded, thread-safe map from image keys to encodings (module docs).
#[derive(Debug)]
pub struct ImageCache<T> {
    entries: Mutex<VecDeque<(u64, Arc<T>)>>,
    capacity: usize,
}

impl<T> Default for ImageCache<T> {
    fn default() -> Self {
        Self::new(IMAGE_CACHE_ENTRIES)
    }
}

impl<T> ImageCache<T> {
    /// A cache of at most `capacity` entries (0 keeps nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// The entries, locked. A panic while the lock was held cannot leave the deque
    /// half-updated, so a poisoned lock is used as it is.
    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Arc<T>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: u64) -> Option<Arc<T>> {
        self.entries()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    /// Keeps `value` under `key`, dropping the oldest entries beyond the capacity.
    pub fn insert(&self, key: u64, value: Arc<T>) {
        let mut entries = self.entries();
        entries.retain(|(k, _)| *k != key);
        entries.push_back((key, value));
        while entries.len() > self.capacity {
            entries.pop_front();
        }
    }

    /// Forgets every entry.
    pub fn clear(&self) {
        self.entries().clear();
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn keys_follow_pixels_size_and_settings() {
        let a = RgbImage::from_pixel(4, 4, Rgb([1, 2, 3]));
        let mut b = a.clone();
        b.put_pixel(3, 3, Rgb([1, 2, 4]));
        let c = RgbImage::from_pixel(8, 2, Rgb([1, 2, 3]));
        let k = image_key(&a, None::<usize>);
        assert_eq!(k, image_key(&a.clone(), None::<usize>));
        assert_ne!(k, image_key(&b, None::<usize>));
        assert_ne!(k, image_key(&c, None::<usize>));
        assert_ne!(k, image_key(&a, Some(64usize)));
    }

    #[test]
    fn keeps_the_most_recent_entries() {
        let cache = ImageCache::new(2);
        for k in 0..3u64 {
            cache.insert(k, Arc::new(k * 10));
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(0).is_none());
        assert_eq!(cache.get(1).as_deref(), Some(&10));
        assert_eq!(cache.get(2).as_deref(), Some(&20));
        // re-inserting a key replaces it and makes it the newest
        cache.insert(1, Arc::new(11));
        cache.insert(3, Arc::new(30));
        assert!(cache.get(2).is_none());
        assert_eq!(cache.get(1).as_deref(), Some(&11));
        cache.clear();
        assert!(cache.is_empty() && cache.get(1).is_none());
        let none = ImageCache::<u8>::new(0);
        none.insert(5, Arc::new(1));
        assert!(none.is_empty());
    }
}
