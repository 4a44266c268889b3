//! The embedded default blob store: a directory on the local file system.
//!
//! A key `a/b/c` is the file `<root>/a/b/c`. Uploads are written to a
//! uniquely named file in `<root>/.tmp` (same file system, so the rename is
//! atomic), fsynced, renamed into place, and the directory fsynced: a crash
//! at any point leaves either the old state or the whole new blob under the
//! key, never half a file. Failed or over-limit uploads remove their
//! temporary file.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use dossier_domain::BlobKey;
use tokio::fs;
use tokio::io::AsyncWriteExt as _;
use tokio_util::io::ReaderStream;

use super::{
    BlobError, BlobListStream, BlobListing, BlobObject, BlobStore, BodyLength, ByteStream,
    HashingLimited, StoredBlob, hashing_limited, limited, shown_key,
};

/// Folder under the root for uploads in progress; never part of a key.
const TMP_DIR: &str = ".tmp";
/// Read size when streaming a blob out.
const READ_CHUNK: usize = 64 * 1024;
/// Temporary files older than this are leftovers of a crash and are removed
/// at open. Younger ones may belong to another process sharing the directory
/// that is uploading right now, so they stay.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Blobs as files under a root directory. See the module docs.
#[derive(Debug, Clone)]
pub struct DirBlobStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl DirBlobStore {
    /// Opens (creating if needed) a store rooted at `root`, and removes
    /// temporary files a crash left behind long ago.
    pub async fn open(root: PathBuf) -> Result<Self, BlobError> {
        let root = std::path::absolute(&root)
            .map_err(|e| BlobError::backend(format!("resolving {}", root.display()), &e))?;
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp)
            .await
            .map_err(|e| BlobError::backend(format!("creating {}", tmp.display()), &e))?;
        let store = Self { root, tmp };
        store.remove_stale_temp_files().await;
        Ok(store)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of `key`, refusing keys that could leave the root or reach
    /// the temporary folder. Domain keys never do; this is defence in depth
    /// against a key recorded by a buggy or older writer.
    fn path_of(&self, key: &str) -> Result<PathBuf, BlobError> {
        let mut path = self.root.clone();
        for (i, segment) in key.split('/').enumerate() {
            if !is_safe_segment(segment) || (i == 0 && segment == TMP_DIR) {
                return Err(BlobError::Backend(format!(
                    "refusing blob key {key:?}: segment {segment:?} is not allowed in a file path"
                )));
            }
            path.push(segment);
        }
        Ok(path)
    }

    /// Best effort: failures are logged, the store works without this.
    async fn remove_stale_temp_files(&self) {
        let Ok(mut entries) = fs::read_dir(&self.tmp).await else {
            return;
        };
        let now = SystemTime::now();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let old = entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok())
                .is_some_and(|age| age > STALE_TEMP_AGE);
            if old {
                let path = entry.path();
                match fs::remove_file(&path).await {
                    Ok(()) => tracing::info!(
                        path = %path.display(),
                        "removed a temporary upload file left by an earlier crash"
                    ),
                    Err(err) => tracing::warn!(
                        path = %path.display(),
                        error = %err,
                        "could not remove a stale temporary upload file; it only wastes space"
                    ),
                }
            }
        }
    }

    /// Makes sure `dir` exists; if it had to be created, fsyncs the parents
    /// up to the root so the new directory entries survive a crash too.
    async fn ensure_dir(&self, dir: &Path) -> Result<(), BlobError> {
        if fs::metadata(dir).await.is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        fs::create_dir_all(dir)
            .await
            .map_err(|e| BlobError::backend(format!("creating {}", dir.display()), &e))?;
        let mut ancestor = dir.parent();
        while let Some(current) = ancestor {
            sync_dir(current).await?;
            if current == self.root {
                break;
            }
            ancestor = current.parent();
        }
        Ok(())
    }
}

/// A key segment that is a plain file name: not empty, not `.` or `..`, no
/// separator or NUL.
fn is_safe_segment(segment: &str) -> bool {
    !segment.is_empty() && segment != "." && segment != ".." && !segment.contains(['\\', '\0'])
}

/// Persists a directory's entries (a rename or a new file in it).
async fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    // Opening a directory read-only and fsyncing it is how POSIX makes
    // entry changes durable; other systems have no equivalent we need.
    if cfg!(unix) {
        let handle = fs::File::open(dir)
            .await
            .map_err(|e| BlobError::backend(format!("opening {}", dir.display()), &e))?;
        handle
            .sync_all()
            .await
            .map_err(|e| BlobError::backend(format!("syncing {}", dir.display()), &e))?;
    }
    Ok(())
}

/// A temporary upload file, removed when dropped unless it was renamed into
/// place. Removing on drop (not only on the error paths) also covers an
/// upload whose future is dropped midway, e.g. when the client disconnects.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // A blocking unlink of one file: cheap, and Drop cannot await.
            if let Err(err) = std::fs::remove_file(&self.path)
                && err.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(
                    path = %self.path.display(),
                    error = %err,
                    "could not remove a temporary upload file; it only wastes space"
                );
            }
        }
    }
}

fn is_absent(err: &io::Error) -> bool {
    // NotADirectory: a key below something that is a file, e.g. `a/b/c` when
    // `a/b` is a blob; there is no blob under such a key either.
    matches!(
        err.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

impl DirBlobStore {
    /// Both puts: `body` (hashing or not) through a temporary file into place.
    async fn write(
        &self,
        key: &BlobKey,
        mut body: HashingLimited,
    ) -> Result<StoredBlob, BlobError> {
        let path = self.path_of(key.as_str())?;
        let parent = path.parent().ok_or_else(|| {
            BlobError::Backend(format!(
                "blob key {} has no parent directory",
                shown_key(key.as_str())
            ))
        })?;
        // Recreated if someone cleaned the folder away while we ran.
        fs::create_dir_all(&self.tmp)
            .await
            .map_err(|e| BlobError::backend(format!("creating {}", self.tmp.display()), &e))?;
        let mut temp = TempFile {
            path: self.tmp.join(format!("{}.part", uuid::Uuid::new_v4())),
            keep: false,
        };
        let writing = |e: io::Error| {
            BlobError::backend(format!("writing blob {}", shown_key(key.as_str())), &e)
        };
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .await
            .map_err(writing)?;
        while let Some(chunk) = body.next_chunk().await? {
            file.write_all(&chunk).await.map_err(writing)?;
        }
        file.flush().await.map_err(writing)?;
        // The bytes must be on disk before the name points at them, or a
        // crash could leave a complete-looking but empty or torn file.
        file.sync_all().await.map_err(writing)?;
        drop(file);

        self.ensure_dir(parent).await?;
        fs::rename(&temp.path, &path).await.map_err(writing)?;
        temp.keep = true;
        sync_dir(parent).await?;
        Ok(body.finish())
    }
}

#[async_trait]
impl BlobStore for DirBlobStore {
    async fn put_sized(
        &self,
        key: &BlobKey,
        body: ByteStream,
        length: BodyLength,
    ) -> Result<StoredBlob, BlobError> {
        self.write(key, hashing_limited(body, length)).await
    }

    async fn put_unhashed(
        &self,
        key: &BlobKey,
        body: ByteStream,
        length: BodyLength,
    ) -> Result<u64, BlobError> {
        Ok(self.write(key, limited(body, length)).await?.size)
    }

    async fn get(&self, key: &BlobKey) -> Result<BlobObject, BlobError> {
        let path = self.path_of(key.as_str())?;
        let file = match fs::File::open(&path).await {
            Ok(file) => file,
            Err(err) if is_absent(&err) => return Err(BlobError::NotFound),
            Err(err) => {
                return Err(BlobError::backend(
                    format!("opening blob {}", shown_key(key.as_str())),
                    &err,
                ));
            }
        };
        let metadata = file.metadata().await.map_err(|e| {
            BlobError::backend(format!("reading blob {}", shown_key(key.as_str())), &e)
        })?;
        if !metadata.is_file() {
            // A directory: the prefix of other keys, not a blob.
            return Err(BlobError::NotFound);
        }
        Ok(BlobObject {
            size: metadata.len(),
            body: Box::pin(ReaderStream::with_capacity(file, READ_CHUNK)),
        })
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        let path = self.path_of(key.as_str())?;
        // Empty parent directories stay: removing them would race with a
        // concurrent put that just created them and is about to rename.
        match fs::remove_file(&path).await {
            Ok(()) => {}
            Err(err) if is_absent(&err) => return Ok(()),
            Err(err) => {
                return Err(BlobError::backend(
                    format!("deleting blob {}", shown_key(key.as_str())),
                    &err,
                ));
            }
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent).await?;
        }
        Ok(())
    }

    async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError> {
        let path = self.path_of(key.as_str())?;
        match fs::metadata(&path).await {
            Ok(metadata) => Ok(metadata.is_file()),
            Err(err) if is_absent(&err) => Ok(false),
            Err(err) => Err(BlobError::backend(
                format!("looking up blob {}", shown_key(key.as_str())),
                &err,
            )),
        }
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BlobListStream<'a> {
        // Start at the deepest directory the prefix names in full, not at
        // the root: listing one tenant should not walk all the others.
        let (start_dir, start_key) = match prefix.rfind('/') {
            None => (self.root.clone(), String::new()),
            Some(slash) => {
                let dir_part = &prefix[..slash];
                match self.path_of(dir_part) {
                    Ok(dir) => (dir, format!("{dir_part}/")),
                    // No stored key has such a segment, so nothing matches.
                    Err(_) => return Box::pin(futures::stream::empty()),
                }
            }
        };
        let walk = Walk {
            prefix,
            open: Vec::new(),
            next_dir: Some((start_dir, start_key)),
        };
        Box::pin(futures::stream::try_unfold(walk, |mut walk| async move {
            Ok(walk.next().await?.map(|listing| (listing, walk)))
        }))
    }

    async fn check(&self) -> Result<(), BlobError> {
        // Read-only, because readiness is polled all the time: the root is
        // still a directory we may write to. A full disk is not seen here; an
        // upload meets it and answers 503 with nothing stored.
        let root = fs::metadata(&self.root)
            .await
            .map_err(|e| BlobError::backend(format!("reading {}", self.root.display()), &e))?;
        if !root.is_dir() {
            return Err(BlobError::Backend(format!(
                "{} is not a directory",
                self.root.display()
            )));
        }
        if root.permissions().readonly() {
            return Err(BlobError::Backend(format!(
                "{} is read-only",
                self.root.display()
            )));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// A depth-first walk of the directories under a prefix, holding one open
/// directory per level (never the names of a whole level): what
/// [`DirBlobStore::list`] streams from.
struct Walk<'a> {
    prefix: &'a str,
    /// The directories being read, deepest last, with the key prefix of each.
    open: Vec<(fs::ReadDir, String)>,
    /// A directory to open before reading on.
    next_dir: Option<(PathBuf, String)>,
}

impl Walk<'_> {
    /// The next blob under the prefix, `None` at the end.
    async fn next(&mut self) -> Result<Option<BlobListing>, BlobError> {
        loop {
            if let Some((dir, key_prefix)) = self.next_dir.take() {
                match fs::read_dir(&dir).await {
                    Ok(entries) => self.open.push((entries, key_prefix)),
                    // Removed meanwhile: nothing under it.
                    Err(err) if is_absent(&err) => {}
                    Err(err) => {
                        return Err(BlobError::backend(
                            format!("listing {}", shown_key(&key_prefix)),
                            &err,
                        ));
                    }
                }
                continue;
            }
            let Some((entries, key_prefix)) = self.open.last_mut() else {
                return Ok(None);
            };
            let listing =
                |e: io::Error| BlobError::backend(format!("listing {}", shown_key(key_prefix)), &e);
            let Some(entry) = entries.next_entry().await.map_err(listing)? else {
                self.open.pop();
                continue;
            };
            let Ok(name) = entry.file_name().into_string() else {
                tracing::warn!(
                    path = %entry.path().display(),
                    "skipping a file whose name is not UTF-8; it cannot be a blob key"
                );
                continue;
            };
            if key_prefix.is_empty() && name == TMP_DIR {
                continue;
            }
            let key = format!("{key_prefix}{name}");
            let file_type = entry.file_type().await.map_err(listing)?;
            if file_type.is_dir() {
                // Only descend where a matching key can be.
                if key.starts_with(self.prefix) || self.prefix.starts_with(&key) {
                    self.next_dir = Some((entry.path(), format!("{key}/")));
                }
            } else if file_type.is_file() && key.starts_with(self.prefix) {
                let metadata = entry.metadata().await.map_err(listing)?;
                return Ok(Some(BlobListing {
                    key,
                    size: metadata.len(),
                    last_modified: metadata.modified().ok(),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> DirBlobStore {
        DirBlobStore {
            root: PathBuf::from("/blobs"),
            tmp: PathBuf::from("/blobs/.tmp"),
        }
    }

    #[test]
    fn keys_map_to_files_under_the_root() {
        assert_eq!(
            store().path_of("t/c/f").unwrap(),
            PathBuf::from("/blobs/t/c/f")
        );
    }

    #[test]
    fn keys_that_could_escape_the_root_are_refused() {
        for key in [
            "", "/t/c", "t//c", "t/./c", "t/../c", "..", "t/c/", ".tmp/x", "t\\..\\c", "t/c\0",
        ] {
            assert!(store().path_of(key).is_err(), "{key:?} was accepted");
        }
    }
}
