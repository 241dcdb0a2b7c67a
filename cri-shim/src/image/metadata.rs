//! Image, name and container-usage records.
//!
//! **Why one JSON file per record, written atomically, and not an embedded database (`redb`,
//! `sled`)?** The data is tiny (a few hundred records at most on a node), written rarely (once
//! per pull, remove or container create) and read from memory. Each change touches exactly one
//! record, so the only atomicity needed is per record, which write-to-temp + fsync + `rename` +
//! fsync of the directory gives on every Linux filesystem; no transaction spans two files,
//! because records are ordered so that any prefix of a sequence of writes is a consistent state:
//! an image record is written before the names pointing at it, and a name moving to another
//! image is one rewrite of that name's file. A crash therefore leaves the old state or the new
//! one (at worst an image record nothing names, which is garbage for [`super::ImageStore::gc`]).
//! Files can be inspected and repaired with `cat` and `rm`, there is no format version to
//! migrate, no dependency to build, and a corrupt record (a disk error) costs that record only,
//! not the whole store: it is moved aside with a warning on open.
//!
//! Layout: `meta/images/<config-hex>.json` ([`ImageRecord`]),
//! `meta/names/<sha256-of-name>.json` ([`NameRecord`]), `meta/containers/<id>.json`
//! ([`ContainerRecord`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::content::Digest;
use super::{IoContext, Result};
use crate::records::RecordDir;

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Blob digest (compressed).
    pub digest: Digest,
    /// Media type in the manifest.
    pub media_type: String,
    /// Blob size.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Chain ID (the snapshot's key).
    pub chain_id: Digest,
}

/// A pulled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image id: the config digest.
    pub id: Digest,
    /// The manifest digest (of the platform's manifest).
    pub manifest_digest: Digest,
    /// The digest the image was resolved through when it came from an index (the repo digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// Config blob size.
    pub config_size: u64,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Sum of the config and layer blob sizes (what the kubelet accounts).
    pub size: u64,
    /// When it was first pulled (seconds since the epoch).
    pub created: u64,
}

impl ImageRecord {
    /// The chain ID of the top layer (the image's rootfs snapshot).
    pub fn top_chain_id(&self) -> Option<&Digest> {
        self.layers.last().map(|l| &l.chain_id)
    }

    /// The digest that names the image in a registry (index digest, else manifest digest).
    pub fn repo_digest(&self) -> &Digest {
        self.index_digest.as_ref().unwrap_or(&self.manifest_digest)
    }
}

/// A name (repo tag or repo digest) pointing at an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    /// `docker.io/library/busybox:latest` or `...@sha256:...`.
    pub name: String,
    /// The image id.
    pub id: Digest,
}

/// A container using an image's layers (its rootfs was prepared from them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// The container id.
    pub id: String,
    /// The image id.
    pub image: Digest,
    /// The top chain ID it uses.
    pub chain_id: Option<Digest>,
}

/// The records, in memory and on disk.
#[derive(Debug)]
pub struct Metadata {
    dir: PathBuf,
    /// Images by id.
    pub images: BTreeMap<Digest, ImageRecord>,
    /// Names by name.
    pub names: BTreeMap<String, Digest>,
    /// Containers by id.
    pub containers: BTreeMap<String, ContainerRecord>,
}

const KINDS: [&str; 3] = ["images", "names", "containers"];

fn name_key(name: &str) -> String {
    Digest::of(name.as_bytes()).hex().to_string()
}

/// Container ids become file names: only `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Metadata {
    /// Loads every record under `root/meta`, removing temporary files and moving corrupt
    /// records aside.
    pub fn open(root: &Path) -> Result<Metadata> {
        let dir = root.join("meta");
        let mut m = Metadata {
            dir,
            images: BTreeMap::new(),
            names: BTreeMap::new(),
            containers: BTreeMap::new(),
        };
        for kind in KINDS {
            let d = m.dir.join(kind);
            std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
        }
        for r in m.load::<ImageRecord>("images")? {
            m.images.insert(r.id.clone(), r);
        }
        for r in m.load::<NameRecord>("names")? {
            m.names.insert(r.name, r.id);
        }
        for r in m.load::<ContainerRecord>("containers")? {
            m.containers.insert(r.id.clone(), r);
        }
        Ok(m)
    }

    fn records(&self, kind: &str) -> RecordDir {
        RecordDir::at(self.dir.join(kind))
    }

    fn load<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>> {
        self.records(kind)
            .load()
            .map_err(|e| super::ImageError::io("loading image metadata", e))
    }

    fn write<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> Result<()> {
        self.records(kind)
            .write(key, value)
            .map_err(|e| super::ImageError::io("writing image metadata", e))
    }

    fn delete(&self, kind: &str, key: &str) -> Result<()> {
        self.records(kind)
            .delete(key)
            .map_err(|e| super::ImageError::io("removing image metadata", e))
    }

    /// Stores an image record.
    pub fn put_image(&mut self, r: ImageRecord) -> Result<()> {
        self.write("images", r.id.hex(), &r)?;
        self.images.insert(r.id.clone(), r);
        Ok(())
    }

    /// Deletes an image record (not its names).
    pub fn delete_image(&mut self, id: &Digest) -> Result<()> {
        self.delete("images", id.hex())?;
        self.images.remove(id);
        Ok(())
    }

    /// Points `name` at `id`.
    pub fn put_name(&mut self, name: &str, id: &Digest) -> Result<()> {
        if self.names.get(name) == Some(id) {
            return Ok(());
        }
        let r = NameRecord {
            name: name.to_string(),
            id: id.clone(),
        };
        self.write("names", &name_key(name), &r)?;
        self.names.insert(name.to_string(), id.clone());
        Ok(())
    }

    /// Removes a name.
    pub fn delete_name(&mut self, name: &str) -> Result<()> {
        self.delete("names", &name_key(name))?;
        self.names.remove(name);
        Ok(())
    }

    /// The names pointing at `id`.
    pub fn names_of(&self, id: &Digest) -> Vec<String> {
        self.names
            .iter()
            .filter(|(_, v)| *v == id)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Records a container's use of an image.
    pub fn put_container(&mut self, r: ContainerRecord) -> Result<()> {
        self.write("containers", &r.id, &r)?;
        self.containers.insert(r.id.clone(), r);
        Ok(())
    }

    /// Forgets a container.
    pub fn delete_container(&mut self, id: &str) -> Result<()> {
        self.delete("containers", id)?;
        self.containers.remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_corruption() {
        let dir = tempfile::Builder::new()
            .prefix("dh-meta-")
            .tempdir()
            .expect("tempdir");
        let id = Digest::of(b"config");
        {
            let mut m = Metadata::open(dir.path()).expect("open");
            m.put_image(ImageRecord {
                id: id.clone(),
                manifest_digest: Digest::of(b"m"),
                index_digest: None,
                config_size: 6,
                layers: vec![],
                size: 6,
                created: 0,
            })
            .expect("image");
            m.put_name("docker.io/library/x:latest", &id).expect("name");
        }
        std::fs::write(dir.path().join("meta/names/.tmp-x-1"), b"partial").expect("tmp");
        std::fs::write(dir.path().join("meta/names/bad.json"), b"{").expect("bad");
        let m = Metadata::open(dir.path()).expect("reopen");
        assert_eq!(m.names_of(&id), ["docker.io/library/x:latest"]);
        assert!(m.images.contains_key(&id));
        assert!(!dir.path().join("meta/names/.tmp-x-1").exists());
        assert!(dir.path().join("meta/names/bad.corrupt").exists());
        assert!(valid_container_id("abc-1_2.x") && !valid_container_id("../x"));
    }
}
