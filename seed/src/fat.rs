//! A minimal FAT12 image writer: one root directory, a volume label, and a few files
//! laid out contiguously, each with VFAT long-file-name (LFN) entries.
//!
//! Geometry (fixed, computed at compile time by [`GEOMETRY`]):
//!
//! | field                | value                         |
//! |----------------------|-------------------------------|
//! | image size           | 2 MiB = 4096 sectors of 512 B |
//! | sectors per cluster  | 4 (2 KiB clusters)            |
//! | reserved sectors     | 1 (the boot sector)           |
//! | FATs                 | 2 copies, 3 sectors each      |
//! | root directory       | 512 entries (32 sectors)      |
//! | data clusters        | 1014 (< 4085, hence FAT12)    |
//! | media descriptor     | 0xF8                          |
//!
//! Every timestamp is 1980-01-01 00:00:00, so the image is a pure function of its
//! inputs (label, serial number, file names and contents).

use crate::SeedError;

/// Bytes per sector.
pub(crate) const SECTOR_SIZE: usize = 512;
/// Sectors in the whole image.
pub(crate) const TOTAL_SECTORS: u32 = 4096;
/// Sectors per allocation cluster.
pub(crate) const SECTORS_PER_CLUSTER: u32 = 4;
/// Sectors before the first FAT (just the boot sector).
pub(crate) const RESERVED_SECTORS: u32 = 1;
/// Number of FAT copies.
pub(crate) const NUM_FATS: u32 = 2;
/// Entries in the fixed-size root directory.
pub(crate) const ROOT_ENTRIES: u32 = 512;
/// Media descriptor byte ("fixed disk").
pub(crate) const MEDIA: u8 = 0xF8;
/// Size of one directory entry.
pub(crate) const DIR_ENTRY_SIZE: usize = 32;
/// Bytes per cluster.
pub(crate) const CLUSTER_SIZE: usize = SECTOR_SIZE * SECTORS_PER_CLUSTER as usize;
/// Whole image size in bytes.
pub(crate) const IMAGE_BYTES: usize = SECTOR_SIZE * TOTAL_SECTORS as usize;

/// FAT12 end-of-chain marker.
const FAT12_EOC: u16 = 0xFFF;
/// Characters of a long name held by one LFN entry.
const LFN_CHARS_PER_ENTRY: usize = 13;
/// Byte offsets of the 13 UCS-2 characters inside an LFN entry.
const LFN_CHAR_OFFSETS: [usize; LFN_CHARS_PER_ENTRY] =
    [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
/// Attribute bits.
pub(crate) const ATTR_ARCHIVE: u8 = 0x20;
pub(crate) const ATTR_VOLUME_ID: u8 = 0x08;
pub(crate) const ATTR_LFN: u8 = 0x0F;
/// FAT date for 1980-01-01 (year offset 0, month 1, day 1).
const FAT_DATE_1980_01_01: u16 = (1 << 5) | 1;

/// Derived layout of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Sectors per FAT copy.
    pub(crate) fat_sectors: u32,
    /// Sectors of the root directory.
    pub(crate) root_dir_sectors: u32,
    /// First sector of the root directory.
    pub(crate) root_dir_sector: u32,
    /// First sector of cluster 2.
    pub(crate) first_data_sector: u32,
    /// Number of data clusters (clusters 2 ..= clusters + 1 exist).
    pub(crate) clusters: u32,
}

/// Computes the smallest FAT size that can map every data cluster it leaves room for.
const fn compute_geometry() -> Geometry {
    let root_dir_sectors = (ROOT_ENTRIES * DIR_ENTRY_SIZE as u32).div_ceil(SECTOR_SIZE as u32);
    let mut fat_sectors = 1;
    loop {
        let first_data_sector = RESERVED_SECTORS + NUM_FATS * fat_sectors + root_dir_sectors;
        let clusters = (TOTAL_SECTORS - first_data_sector) / SECTORS_PER_CLUSTER;
        // FAT12 packs two 12-bit entries in three bytes; entries 0 and 1 are reserved.
        let fat_bytes = ((clusters + 2) * 3).div_ceil(2);
        if fat_bytes <= fat_sectors * SECTOR_SIZE as u32 {
            return Geometry {
                fat_sectors,
                root_dir_sectors,
                root_dir_sector: RESERVED_SECTORS + NUM_FATS * fat_sectors,
                first_data_sector,
                clusters,
            };
        }
        fat_sectors += 1;
    }
}

/// The image layout.
pub(crate) const GEOMETRY: Geometry = compute_geometry();

// FAT12 is defined by the cluster count alone: fewer than 4085 clusters.
const _: () = assert!(GEOMETRY.clusters < 4085 && GEOMETRY.clusters > 16);
const _: () = assert!(TOTAL_SECTORS <= u16::MAX as u32);

/// Bytes of file data the image can hold (whole clusters).
pub(crate) const DATA_CAPACITY: usize = GEOMETRY.clusters as usize * CLUSTER_SIZE;

/// One file of the root directory.
pub(crate) struct File<'a> {
    /// Long name (stored as LFN entries; the 8.3 alias is generated).
    pub(crate) name: &'a str,
    /// Contents.
    pub(crate) data: &'a [u8],
}

/// Copies `bytes` into `image` at `offset`, refusing to write outside it.
fn put(image: &mut [u8], offset: usize, bytes: &[u8]) -> Result<(), SeedError> {
    let end = offset
        .checked_add(bytes.len())
        .ok_or(SeedError::Layout { offset })?;
    image
        .get_mut(offset..end)
        .ok_or(SeedError::Layout { offset })?
        .copy_from_slice(bytes);
    Ok(())
}

/// Sets FAT12 entry `cluster` to `value` (12 bits).
pub(crate) fn fat12_set(fat: &mut [u8], cluster: u32, value: u16) -> Result<(), SeedError> {
    let offset = cluster as usize * 3 / 2;
    let pair: &mut [u8; 2] = fat
        .get_mut(offset..offset + 2)
        .and_then(|s| s.try_into().ok())
        .ok_or(SeedError::Layout { offset })?;
    let old = u16::from_le_bytes(*pair);
    let new = if cluster % 2 == 0 {
        (old & 0xF000) | (value & 0x0FFF)
    } else {
        (old & 0x000F) | ((value & 0x0FFF) << 4)
    };
    pair.copy_from_slice(&new.to_le_bytes());
    Ok(())
}

/// The checksum of an 8.3 name that every LFN entry of that file carries.
pub(crate) fn lfn_checksum(short_name: &[u8; 11]) -> u8 {
    short_name.iter().fold(0u8, |sum, &b| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b)
    })
}

/// Whether `b` may appear in an 8.3 short name (upper-case form).
fn is_short_name_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'()-@^_`{}~".contains(&b)
}

/// Generates the 8.3 alias `BASIS~N.EXT` for `long`, unique among `taken`.
/// Returns the alias and whether it is an exact (upper-case) rendering of `long`,
/// in which case no LFN entries are needed.
fn short_name(long: &str, taken: &[[u8; 11]]) -> Result<([u8; 11], bool), SeedError> {
    let (base, ext) = match long.rfind('.') {
        Some(dot) if dot > 0 => (
            long.get(..dot).unwrap_or(long),
            long.get(dot + 1..).unwrap_or(""),
        ),
        _ => (long, ""),
    };
    let clean = |s: &str| -> Vec<u8> {
        s.bytes()
            .map(|b| b.to_ascii_uppercase())
            .filter(|&b| is_short_name_char(b))
            .collect()
    };
    let (cbase, cext) = (clean(base), clean(ext));
    let exact = long.bytes().all(|b| b == b'.' || is_short_name_char(b))
        && !cbase.is_empty()
        && cbase.len() <= 8
        && cext.len() <= 3
        && long.matches('.').count() <= 1
        && cbase.len() == base.len()
        && cext.len() == ext.len();
    let mut name = [b' '; 11];
    if exact {
        put(&mut name, 0, &cbase)?;
        put(&mut name, 8, &cext)?;
        if !taken.contains(&name) {
            return Ok((name, true));
        }
    }
    let ext3 = cext.get(..cext.len().min(3)).unwrap_or(&[]);
    for n in 1..=999_999u32 {
        let tail = format!("~{n}");
        let keep = 8usize.saturating_sub(tail.len()).min(cbase.len());
        let mut candidate = [b' '; 11];
        let stem = cbase.get(..keep).unwrap_or(&[]);
        let stem: &[u8] = if stem.is_empty() { b"_" } else { stem };
        put(&mut candidate, 0, stem)?;
        put(&mut candidate, stem.len(), tail.as_bytes())?;
        put(&mut candidate, 8, ext3)?;
        if !taken.contains(&candidate) {
            return Ok((candidate, false));
        }
    }
    Err(SeedError::Layout { offset: 0 })
}

/// A 32-byte short (8.3) directory entry.
fn short_entry(name: &[u8; 11], attr: u8, first_cluster: u16, size: u32) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    // 13: creation time, tenths of a second; 14..16 creation time; all zero.
    e[16..18].copy_from_slice(&FAT_DATE_1980_01_01.to_le_bytes()); // creation date
    e[18..20].copy_from_slice(&FAT_DATE_1980_01_01.to_le_bytes()); // access date
                                                                   // 20..22: high cluster word (FAT32 only), 22..24: modification time = 00:00:00.
    e[24..26].copy_from_slice(&FAT_DATE_1980_01_01.to_le_bytes()); // modification date
    e[26..28].copy_from_slice(&first_cluster.to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// The LFN entries for `long`, in on-disk order (last part first).
fn lfn_entries(long: &str, checksum: u8) -> Result<Vec<[u8; 32]>, SeedError> {
    let units: Vec<u16> = long.encode_utf16().collect();
    let count = units.len().div_ceil(LFN_CHARS_PER_ENTRY);
    if count == 0 || count > 20 || long.chars().any(|c| c.len_utf16() != 1) {
        // Empty names, names over 255 characters and non-BMP characters (which UCS-2
        // cannot hold) never reach here: the crate only writes its own fixed names.
        return Err(SeedError::Layout { offset: 0 });
    }
    let mut entries = Vec::with_capacity(count);
    for ordinal in (1..=count).rev() {
        let mut e = [0u8; 32];
        let last = if ordinal == count { 0x40 } else { 0 };
        e[0] = u8::try_from(ordinal).map_err(|_| SeedError::Layout { offset: 0 })? | last;
        e[11] = ATTR_LFN;
        e[13] = checksum;
        // 12: type (0), 26..28: first cluster (always 0).
        let start = (ordinal - 1) * LFN_CHARS_PER_ENTRY;
        for (i, &off) in LFN_CHAR_OFFSETS.iter().enumerate() {
            let unit = match units.get(start + i) {
                Some(&u) => u,
                None if start + i == units.len() => 0x0000, // terminator
                None => 0xFFFF,                             // padding
            };
            put(&mut e, off, &unit.to_le_bytes())?;
        }
        entries.push(e);
    }
    Ok(entries)
}

/// The boot sector with its BIOS parameter block.
fn boot_sector(label: &[u8; 11], serial: u32) -> [u8; SECTOR_SIZE] {
    let g = GEOMETRY;
    let mut b = [0u8; SECTOR_SIZE];
    b[0..3].copy_from_slice(&[0xEB, 0x3C, 0x90]); // jmp short 0x3E; nop
    b[3..11].copy_from_slice(b"KESTREL ");
    b[11..13].copy_from_slice(&(SECTOR_SIZE as u16).to_le_bytes());
    b[13] = SECTORS_PER_CLUSTER as u8;
    b[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
    b[16] = NUM_FATS as u8;
    b[17..19].copy_from_slice(&(ROOT_ENTRIES as u16).to_le_bytes());
    b[19..21].copy_from_slice(&(TOTAL_SECTORS as u16).to_le_bytes());
    b[21] = MEDIA;
    b[22..24].copy_from_slice(&(g.fat_sectors as u16).to_le_bytes());
    b[24..26].copy_from_slice(&32u16.to_le_bytes()); // sectors per track
    b[26..28].copy_from_slice(&64u16.to_le_bytes()); // heads
                                                     // 28..32 hidden sectors = 0, 32..36 32-bit total sectors = 0 (the 16-bit one is used).
    b[36] = 0x80; // drive number
    b[38] = 0x29; // extended boot signature: serial, label and type follow
    b[39..43].copy_from_slice(&serial.to_le_bytes());
    b[43..54].copy_from_slice(label);
    b[54..62].copy_from_slice(b"FAT12   ");
    // Boot code: the volume is not bootable; spin with interrupts off.
    b[62..66].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFD]); // cli; hlt; jmp $-1
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

/// Builds the whole image: boot sector, two FATs, the root directory (volume label
/// first, then each file's LFN entries and short entry), and the file data.
pub(crate) fn build(
    label: &[u8; 11],
    serial: u32,
    files: &[File<'_>],
) -> Result<Vec<u8>, SeedError> {
    let g = GEOMETRY;
    let needed: usize = files
        .iter()
        .map(|f| f.data.len().div_ceil(CLUSTER_SIZE) * CLUSTER_SIZE)
        .sum();
    if needed > DATA_CAPACITY {
        return Err(SeedError::TooLarge {
            needed,
            capacity: DATA_CAPACITY,
        });
    }

    let mut image = vec![0u8; IMAGE_BYTES];
    put(&mut image, 0, &boot_sector(label, serial))?;

    let mut fat = vec![0u8; g.fat_sectors as usize * SECTOR_SIZE];
    fat12_set(&mut fat, 0, 0xF00 | u16::from(MEDIA))?;
    fat12_set(&mut fat, 1, FAT12_EOC)?;

    let mut root: Vec<[u8; 32]> = vec![short_entry(label, ATTR_VOLUME_ID, 0, 0)];
    let mut taken: Vec<[u8; 11]> = Vec::new();
    let mut next_cluster: u32 = 2;
    for file in files {
        let size = u32::try_from(file.data.len()).map_err(|_| SeedError::TooLarge {
            needed,
            capacity: DATA_CAPACITY,
        })?;
        let clusters = u32::try_from(file.data.len().div_ceil(CLUSTER_SIZE)).map_err(|_| {
            SeedError::TooLarge {
                needed,
                capacity: DATA_CAPACITY,
            }
        })?;
        let first = if clusters == 0 { 0 } else { next_cluster };
        for c in first..first + clusters {
            let value = if c + 1 == first + clusters {
                FAT12_EOC
            } else {
                u16::try_from(c + 1).map_err(|_| SeedError::Layout { offset: 0 })?
            };
            fat12_set(&mut fat, c, value)?;
        }
        if clusters > 0 {
            let offset =
                (g.first_data_sector + (first - 2) * SECTORS_PER_CLUSTER) as usize * SECTOR_SIZE;
            put(&mut image, offset, file.data)?;
        }
        next_cluster += clusters;

        let (short, exact) = short_name(file.name, &taken)?;
        taken.push(short);
        if !exact {
            root.extend(lfn_entries(file.name, lfn_checksum(&short))?);
        }
        let first16 = u16::try_from(first).map_err(|_| SeedError::Layout { offset: 0 })?;
        root.push(short_entry(&short, ATTR_ARCHIVE, first16, size));
    }
    if root.len() > ROOT_ENTRIES as usize {
        return Err(SeedError::Layout {
            offset: g.root_dir_sector as usize * SECTOR_SIZE,
        });
    }

    for copy in 0..NUM_FATS {
        let offset = (RESERVED_SECTORS + copy * g.fat_sectors) as usize * SECTOR_SIZE;
        put(&mut image, offset, &fat)?;
    }
    let root_offset = g.root_dir_sector as usize * SECTOR_SIZE;
    for (i, entry) in root.iter().enumerate() {
        put(&mut image, root_offset + i * DIR_ENTRY_SIZE, entry)?;
    }
    Ok(image)
}

/// [`short_name`] for the unit tests.
#[cfg(test)]
pub(crate) fn short_name_for_tests(long: &str, taken: &[[u8; 11]]) -> ([u8; 11], bool) {
    short_name(long, taken).unwrap_or(([0; 11], false))
}
