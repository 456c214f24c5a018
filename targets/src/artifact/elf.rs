//! ELF layout and emission for the artifact writer: this module owns the file layout (which
//! segment and section holds what, at which offset and address), the dynamic-linking tables
//! (.hash, .gnu.hash, .dynsym, .dynstr, .dynamic) and the debugging tables (.symtab, .strtab),
//! all written through `object::write::elf::Writer` in one reserve pass and one write pass.
//!
//! Layout, in file order (addresses ascending, each PT_LOAD congruent to its file offset modulo
//! its p_align, and every PT_LOAD starting on a fresh p_align-sized page so that segments with
//! different permissions never share a page):
//! - PT_LOAD R: ELF header, program headers, .hash, .gnu.hash, .dynsym, .dynstr (at address 0);
//! - PT_LOAD R+X: .text, the functions in spec order, each aligned to its `align`;
//! - PT_LOAD R: .rodata, the data blobs in spec order, each aligned to its `align`;
//! - PT_LOAD R+W: .dynamic alone (glibc before 2.35 rewrites .dynamic in place on load);
//! - not loaded: .symtab, .strtab, .shstrtab and the section headers.
//!
//! PT_DYNAMIC points at .dynamic and PT_GNU_STACK asks for a non-executable stack. An empty
//! .text or .rodata keeps its section header but gets no PT_LOAD.

use object::elf;
use object::write::elf::{FileHeader, ProgramHeader, SectionHeader, SectionIndex, Sym, Writer};
use object::write::StringId;
use object::Endianness;

use super::reloc::{self, Addresses};
use super::symbols::SymbolTable;
use super::{Arch, ArtifactError, ArtifactSpec};

/// p_align of every PT_LOAD on x86-64: 16 KiB, a multiple of every x86-64 page size.
const X86_64_SEGMENT_ALIGN: u64 = 0x4000;
/// p_align of every PT_LOAD on aarch64: 64 KiB, so the file loads with 4, 16 (Android 15+)
/// and 64 KiB kernel pages alike. It costs address space only, not file size.
const AARCH64_SEGMENT_ALIGN: u64 = 0x1_0000;

/// Entries of .dynamic: SONAME, HASH, GNU_HASH, STRTAB, SYMTAB, STRSZ, SYMENT, NULL.
const DYNAMIC_ENTRIES: usize = 8;
const SYM64_SIZE: u64 = 24;
const DYN64_SIZE: u64 = 16;
/// Alignment of the .dynamic table itself (PT_DYNAMIC's p_align): that of an Elf64_Dyn.
const DYNAMIC_ALIGN: u64 = 8;
/// Bloom filter shift of .gnu.hash (the value lld and GNU ld use).
const GNU_HASH_BLOOM_SHIFT: u32 = 26;

/// Writes the shared object for a spec whose names `symbols` has already validated.
pub(super) fn write(
    spec: &ArtifactSpec,
    symbols: &SymbolTable<'_>,
) -> Result<Vec<u8>, ArtifactError> {
    let mut buffer = Vec::new();
    let mut writer = Writer::new(Endianness::Little, true, &mut buffer);
    let plan = reserve(&mut writer, spec, symbols);
    let code = reloc::patch_functions(spec, symbols, &plan.addresses)?;
    emit(&mut writer, spec, &plan, &code)?;
    let (written, reserved) = (writer.len(), writer.reserved_len());
    if written != reserved {
        return Err(ArtifactError::Elf(format!(
            "wrote {written} bytes but reserved {reserved}"
        )));
    }
    Ok(buffer)
}

/// A range of the file mapped at an address.
#[derive(Clone, Copy, Debug, Default)]
struct Segment {
    offset: u64,
    vaddr: u64,
    size: u64,
    align: u64,
}

impl Segment {
    fn end_vaddr(&self) -> u64 {
        self.vaddr + self.size
    }

    fn header(&self, p_type: u32, p_flags: u32) -> ProgramHeader {
        ProgramHeader {
            p_type,
            p_flags,
            p_offset: self.offset,
            p_vaddr: self.vaddr,
            p_paddr: self.vaddr,
            p_filesz: self.size,
            p_memsz: self.size,
            p_align: self.align,
        }
    }
}

/// Blobs placed one after another in one segment.
#[derive(Debug, Default)]
struct Placed {
    segment: Segment,
    /// File offset of each blob.
    offsets: Vec<u64>,
    /// Address of each blob.
    addresses: Vec<u64>,
    /// Largest blob alignment (the section's sh_addralign).
    max_align: u64,
    /// Whether any blob has bytes; an empty segment gets no PT_LOAD.
    loaded: bool,
}

impl Placed {
    /// The end address of the segment if it is loaded, else `cursor` unchanged.
    fn end_vaddr_or(&self, cursor: u64) -> u64 {
        if self.loaded {
            self.segment.end_vaddr()
        } else {
            cursor
        }
    }
}

/// Sizes of the symbol hash tables.
#[derive(Clone, Copy, Debug)]
struct HashParams {
    sysv_buckets: u32,
    gnu_buckets: u32,
    bloom_words: u32,
}

impl HashParams {
    fn for_exports(count: usize) -> Self {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        HashParams {
            sysv_buckets: count.max(1),
            gnu_buckets: (count / 4).max(1),
            // About 12 bits of 64-bit bloom words per symbol, a power of two as loaders require.
            bloom_words: (count.saturating_mul(12) / 64).max(1).next_power_of_two(),
        }
    }
}

/// String ids of the section names that the writer's helpers do not own.
#[derive(Clone, Copy, Debug)]
struct OwnSections {
    text_name: StringId,
    text: SectionIndex,
    rodata_name: StringId,
    rodata: SectionIndex,
}

/// The dynamic symbols and strings, decided before any file range is reserved.
struct DynamicNames {
    /// Exported function indices in .dynsym order (sorted by .gnu.hash bucket).
    order: Vec<usize>,
    /// .dynstr ids of `order`.
    export_names: Vec<StringId>,
    soname: StringId,
}

/// The header segment and where its dynamic-linking tables lie (address = file offset).
struct HeaderTables {
    segment: Segment,
    hash_addr: u64,
    gnu_hash_addr: u64,
    dynsym_addr: u64,
    dynstr_addr: u64,
    dynstr_len: u64,
}

/// Everything decided in the reserve pass that the write pass needs.
struct Plan {
    phnum: u32,
    hash: HashParams,
    names: DynamicNames,
    /// .strtab ids of the functions then the data blobs, in spec order.
    local_names: Vec<StringId>,
    sections: OwnSections,
    tables: HeaderTables,
    text: Placed,
    rodata: Placed,
    dynamic: Segment,
    addresses: Addresses,
}

fn segment_align(arch: Arch) -> u64 {
    match arch {
        Arch::X86_64 => X86_64_SEGMENT_ALIGN,
        Arch::Aarch64 => AARCH64_SEGMENT_ALIGN,
    }
}

fn machine(arch: Arch) -> u16 {
    match arch {
        Arch::X86_64 => elf::EM_X86_64,
        Arch::Aarch64 => elf::EM_AARCH64,
    }
}

/// Bytes that fill the gaps between functions: `int3` on x86-64, `udf #0` on aarch64.
fn code_fill(arch: Arch) -> u8 {
    match arch {
        Arch::X86_64 => 0xcc,
        Arch::Aarch64 => 0x00,
    }
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

/// The first address at or after `cursor` that starts a fresh `align` page and is congruent
/// to `offset` modulo `align`.
fn congruent_vaddr(cursor: u64, offset: u64, align: u64) -> u64 {
    align_up(cursor, align) + offset % align
}

fn to_elf_error(error: object::write::Error) -> ArtifactError {
    ArtifactError::Elf(error.to_string())
}

/// Orders the exports by .gnu.hash bucket (stable, so ties keep spec order), as the GNU hash
/// table requires of the hashed symbols.
fn dynsym_order(spec: &ArtifactSpec, exports: &[usize], gnu_buckets: u32) -> Vec<usize> {
    let mut order = exports.to_vec();
    order.sort_by_key(|&f| elf::gnu_hash(spec.functions[f].name.as_bytes()) % gnu_buckets);
    order
}

/// Reserve pass: names, indices and file ranges, in the order the write pass will follow.
fn reserve<'a>(writer: &mut Writer<'a>, spec: &'a ArtifactSpec, symbols: &SymbolTable<'_>) -> Plan {
    let base_align = segment_align(spec.arch);
    let sections = reserve_section_indices(writer);
    let hash = HashParams::for_exports(symbols.exports().len());
    let names = reserve_dynamic_names(writer, spec, symbols.exports(), hash);
    let local_names = reserve_local_symbols(writer, spec, sections);

    let text_loaded = spec.functions.iter().any(|f| !f.code.is_empty());
    let rodata_loaded = spec.rodata.iter().any(|d| !d.bytes.is_empty());
    // Header, text and rodata PT_LOADs, the .dynamic PT_LOAD, PT_DYNAMIC, PT_GNU_STACK.
    let phnum = 4 + u32::from(text_loaded) + u32::from(rodata_loaded);
    let tables = reserve_header_segment(writer, phnum, hash, base_align);

    let code_blobs: Vec<(usize, u64)> = spec
        .functions
        .iter()
        .map(|f| (f.code.len(), f.align))
        .collect();
    let cursor = tables.segment.end_vaddr();
    let text = reserve_blobs(writer, &code_blobs, base_align, cursor);
    let cursor = text.end_vaddr_or(cursor);
    let data_blobs: Vec<(usize, u64)> = spec
        .rodata
        .iter()
        .map(|d| (d.bytes.len(), d.align))
        .collect();
    let rodata = reserve_blobs(writer, &data_blobs, base_align, cursor);
    let cursor = rodata.end_vaddr_or(cursor);
    let dynamic = reserve_dynamic_segment(writer, base_align, cursor);

    writer.reserve_symtab();
    writer.reserve_strtab();
    writer.reserve_shstrtab();
    writer.reserve_section_headers();

    let addresses = Addresses {
        functions: text.addresses.clone(),
        data: rodata.addresses.clone(),
    };
    Plan {
        phnum,
        hash,
        names,
        local_names,
        sections,
        tables,
        text,
        rodata,
        dynamic,
        addresses,
    }
}

/// Adds the soname and the exports to .dynstr and reserves their .dynsym entries.
fn reserve_dynamic_names<'a>(
    writer: &mut Writer<'a>,
    spec: &'a ArtifactSpec,
    exports: &[usize],
    hash: HashParams,
) -> DynamicNames {
    let soname = writer.add_dynamic_string(spec.soname.as_bytes());
    writer.reserve_null_dynamic_symbol_index();
    let order = dynsym_order(spec, exports, hash.gnu_buckets);
    let export_names = order
        .iter()
        .map(|&f| {
            writer.reserve_dynamic_symbol_index();
            writer.add_dynamic_string(spec.functions[f].name.as_bytes())
        })
        .collect();
    DynamicNames {
        order,
        export_names,
        soname,
    }
}

/// Reserves the first segment: ELF header, program headers, .hash, .gnu.hash, .dynsym, .dynstr.
fn reserve_header_segment(
    writer: &mut Writer<'_>,
    phnum: u32,
    hash: HashParams,
    base_align: u64,
) -> HeaderTables {
    writer.reserve_file_header();
    writer.reserve_program_headers(phnum);
    let dynsym_count = writer.dynamic_symbol_count();
    let hash_addr = writer.reserve_hash(hash.sysv_buckets, dynsym_count) as u64;
    let gnu_hash_addr =
        writer.reserve_gnu_hash(hash.bloom_words, hash.gnu_buckets, dynsym_count - 1) as u64;
    let dynsym_addr = writer.reserve_dynsym() as u64;
    let dynstr_addr = writer.reserve_dynstr() as u64;
    let dynstr_len = writer.dynstr_len() as u64;
    let size = writer.reserved_len() as u64;
    HeaderTables {
        segment: Segment {
            offset: 0,
            vaddr: 0,
            size,
            align: base_align,
        },
        hash_addr,
        gnu_hash_addr,
        dynsym_addr,
        dynstr_addr,
        dynstr_len,
    }
}

/// Reserves .dynamic, alone in its read-write segment.
fn reserve_dynamic_segment(writer: &mut Writer<'_>, base_align: u64, cursor: u64) -> Segment {
    let offset = writer.reserve_dynamic(DYNAMIC_ENTRIES) as u64;
    Segment {
        offset,
        vaddr: congruent_vaddr(cursor, offset, base_align),
        size: DYNAMIC_ENTRIES as u64 * DYN64_SIZE,
        align: base_align,
    }
}

/// Reserves the section indices in header order: .hash, .gnu.hash, .dynsym, .dynstr, .text,
/// .rodata, .dynamic, .symtab, .strtab, .shstrtab (index 0 is the null section).
fn reserve_section_indices(writer: &mut Writer<'_>) -> OwnSections {
    writer.reserve_hash_section_index();
    writer.reserve_gnu_hash_section_index();
    writer.reserve_dynsym_section_index();
    writer.reserve_dynstr_section_index();
    let text_name = writer.add_section_name(b".text");
    let text = writer.reserve_section_index();
    let rodata_name = writer.add_section_name(b".rodata");
    let rodata = writer.reserve_section_index();
    writer.reserve_dynamic_section_index();
    writer.reserve_symtab_section_index();
    writer.reserve_strtab_section_index();
    writer.reserve_shstrtab_section_index();
    OwnSections {
        text_name,
        text,
        rodata_name,
        rodata,
    }
}

/// Adds every function and data blob to .symtab/.strtab as a local symbol.
fn reserve_local_symbols<'a>(
    writer: &mut Writer<'a>,
    spec: &'a ArtifactSpec,
    sections: OwnSections,
) -> Vec<StringId> {
    writer.reserve_null_symbol_index();
    let functions = spec
        .functions
        .iter()
        .map(|f| (f.name.as_bytes(), sections.text));
    let data = spec
        .rodata
        .iter()
        .map(|d| (d.name.as_bytes(), sections.rodata));
    functions
        .chain(data)
        .map(|(name, section)| {
            writer.reserve_symbol_index(Some(section));
            writer.add_string(name)
        })
        .collect()
}

/// Reserves file ranges for blobs of (length, alignment) and gives the segment its address.
fn reserve_blobs(
    writer: &mut Writer<'_>,
    blobs: &[(usize, u64)],
    base_align: u64,
    cursor: u64,
) -> Placed {
    let offsets: Vec<u64> = blobs
        .iter()
        .map(|&(len, align)| writer.reserve(len, align as usize) as u64)
        .collect();
    let start = offsets
        .first()
        .copied()
        .unwrap_or(writer.reserved_len() as u64);
    let size = writer.reserved_len() as u64 - start;
    let max_align = blobs.iter().map(|&(_, align)| align).max().unwrap_or(1);
    let align = base_align.max(max_align);
    let vaddr = congruent_vaddr(cursor, start, align);
    Placed {
        segment: Segment {
            offset: start,
            vaddr,
            size,
            align,
        },
        addresses: offsets.iter().map(|&o| vaddr + (o - start)).collect(),
        offsets,
        max_align,
        loaded: blobs.iter().any(|&(len, _)| len > 0),
    }
}

/// Write pass: everything in the order `reserve` laid it out.
fn emit(
    writer: &mut Writer<'_>,
    spec: &ArtifactSpec,
    plan: &Plan,
    code: &[Vec<u8>],
) -> Result<(), ArtifactError> {
    writer
        .write_file_header(&FileHeader {
            os_abi: elf::ELFOSABI_NONE,
            abi_version: 0,
            e_type: elf::ET_DYN,
            e_machine: machine(spec.arch),
            e_entry: 0,
            e_flags: 0,
        })
        .map_err(to_elf_error)?;
    emit_program_headers(writer, plan);
    emit_hash_tables(writer, spec, plan);
    emit_dynamic_symbols(writer, spec, plan);
    writer.write_dynstr();
    let fill = code_fill(spec.arch);
    emit_blobs(
        writer,
        &plan.text.offsets,
        code.iter().map(Vec::as_slice),
        fill,
    );
    emit_blobs(
        writer,
        &plan.rodata.offsets,
        spec.rodata.iter().map(|d| d.bytes.as_slice()),
        0,
    );
    emit_dynamic(writer, plan)?;
    emit_local_symbols(writer, spec, plan);
    writer.write_strtab();
    writer.write_shstrtab();
    emit_section_headers(writer, plan);
    Ok(())
}

fn emit_program_headers(writer: &mut Writer<'_>, plan: &Plan) {
    writer.write_align_program_headers();
    let mut headers = vec![plan.tables.segment.header(elf::PT_LOAD, elf::PF_R)];
    if plan.text.loaded {
        headers.push(
            plan.text
                .segment
                .header(elf::PT_LOAD, elf::PF_R | elf::PF_X),
        );
    }
    if plan.rodata.loaded {
        headers.push(plan.rodata.segment.header(elf::PT_LOAD, elf::PF_R));
    }
    headers.push(plan.dynamic.header(elf::PT_LOAD, elf::PF_R | elf::PF_W));
    let dynamic_table = Segment {
        align: DYNAMIC_ALIGN,
        ..plan.dynamic
    };
    headers.push(dynamic_table.header(elf::PT_DYNAMIC, elf::PF_R | elf::PF_W));
    headers.push(gnu_stack_header());
    debug_assert_eq!(headers.len(), plan.phnum as usize);
    for header in &headers {
        writer.write_program_header(header);
    }
}

/// PT_GNU_STACK with R+W and no X: without it glibc assumes an executable stack.
fn gnu_stack_header() -> ProgramHeader {
    ProgramHeader {
        p_type: elf::PT_GNU_STACK,
        p_flags: elf::PF_R | elf::PF_W,
        p_offset: 0,
        p_vaddr: 0,
        p_paddr: 0,
        p_filesz: 0,
        p_memsz: 0,
        p_align: 16,
    }
}

fn emit_hash_tables(writer: &mut Writer<'_>, spec: &ArtifactSpec, plan: &Plan) {
    let names: Vec<&[u8]> = plan
        .names
        .order
        .iter()
        .map(|&f| spec.functions[f].name.as_bytes())
        .collect();
    let dynsym_count = names.len() as u32 + 1;
    // .hash covers every .dynsym entry; entry 0 is the null symbol.
    writer.write_hash(plan.hash.sysv_buckets, dynsym_count, |i| {
        let index = (i as usize).checked_sub(1)?;
        names.get(index).map(|name| elf::hash(name))
    });
    // .gnu.hash covers the exports, which start at .dynsym index 1.
    writer.write_gnu_hash(
        1,
        GNU_HASH_BLOOM_SHIFT,
        plan.hash.bloom_words,
        plan.hash.gnu_buckets,
        dynsym_count - 1,
        |i| names.get(i as usize).map_or(0, |name| elf::gnu_hash(name)),
    );
}

fn emit_dynamic_symbols(writer: &mut Writer<'_>, spec: &ArtifactSpec, plan: &Plan) {
    writer.write_null_dynamic_symbol();
    for (&f, &name) in plan.names.order.iter().zip(&plan.names.export_names) {
        writer.write_dynamic_symbol(&Sym {
            name: Some(name),
            section: Some(plan.sections.text),
            st_info: (elf::STB_GLOBAL << 4) | elf::STT_FUNC,
            st_other: elf::STV_DEFAULT,
            st_shndx: 0,
            st_value: plan.addresses.functions[f],
            st_size: spec.functions[f].code.len() as u64,
        });
    }
}

/// Writes blobs at their reserved offsets, filling the gaps with `fill`.
fn emit_blobs<'b>(
    writer: &mut Writer<'_>,
    offsets: &[u64],
    blobs: impl Iterator<Item = &'b [u8]>,
    fill: u8,
) {
    for (&offset, bytes) in offsets.iter().zip(blobs) {
        let gap = (offset as usize).saturating_sub(writer.len());
        writer.write(&vec![fill; gap]);
        writer.write(bytes);
    }
}

fn emit_dynamic(writer: &mut Writer<'_>, plan: &Plan) -> Result<(), ArtifactError> {
    writer.pad_until(plan.dynamic.offset as usize);
    writer.write_align_dynamic();
    writer
        .write_dynamic_string(elf::DT_SONAME, plan.names.soname)
        .map_err(to_elf_error)?;
    let entries = [
        (elf::DT_HASH, plan.tables.hash_addr),
        (elf::DT_GNU_HASH, plan.tables.gnu_hash_addr),
        (elf::DT_STRTAB, plan.tables.dynstr_addr),
        (elf::DT_SYMTAB, plan.tables.dynsym_addr),
        (elf::DT_STRSZ, plan.tables.dynstr_len),
        (elf::DT_SYMENT, SYM64_SIZE),
        (elf::DT_NULL, 0),
    ];
    for (tag, value) in entries {
        writer.write_dynamic(tag, value).map_err(to_elf_error)?;
    }
    Ok(())
}

fn emit_local_symbols(writer: &mut Writer<'_>, spec: &ArtifactSpec, plan: &Plan) {
    writer.write_null_symbol();
    let functions = spec
        .functions
        .iter()
        .zip(&plan.addresses.functions)
        .map(|(f, &address)| (plan.sections.text, elf::STT_FUNC, address, f.code.len()));
    let data = spec
        .rodata
        .iter()
        .zip(&plan.addresses.data)
        .map(|(d, &address)| {
            (
                plan.sections.rodata,
                elf::STT_OBJECT,
                address,
                d.bytes.len(),
            )
        });
    for ((section, kind, address, size), &name) in functions.chain(data).zip(&plan.local_names) {
        writer.write_symbol(&Sym {
            name: Some(name),
            section: Some(section),
            st_info: (elf::STB_LOCAL << 4) | kind,
            st_other: elf::STV_DEFAULT,
            st_shndx: 0,
            st_value: address,
            st_size: size as u64,
        });
    }
}

fn emit_section_headers(writer: &mut Writer<'_>, plan: &Plan) {
    writer.write_null_section_header();
    writer.write_hash_section_header(plan.tables.hash_addr);
    writer.write_gnu_hash_section_header(plan.tables.gnu_hash_addr);
    writer.write_dynsym_section_header(plan.tables.dynsym_addr, 1);
    writer.write_dynstr_section_header(plan.tables.dynstr_addr);
    let sections = plan.sections;
    let text_flags = elf::SHF_ALLOC | elf::SHF_EXECINSTR;
    writer.write_section_header(&blob_section_header(
        sections.text_name,
        &plan.text,
        text_flags,
    ));
    writer.write_section_header(&blob_section_header(
        sections.rodata_name,
        &plan.rodata,
        elf::SHF_ALLOC,
    ));
    writer.write_dynamic_section_header(plan.dynamic.vaddr);
    writer.write_symtab_section_header(1 + plan.local_names.len() as u32);
    writer.write_strtab_section_header();
    writer.write_shstrtab_section_header();
}

fn blob_section_header(name: StringId, placed: &Placed, flags: u32) -> SectionHeader {
    SectionHeader {
        name: Some(name),
        sh_type: elf::SHT_PROGBITS,
        sh_flags: flags.into(),
        sh_addr: placed.segment.vaddr,
        sh_offset: placed.segment.offset,
        sh_size: placed.segment.size,
        sh_link: 0,
        sh_info: 0,
        sh_addralign: placed.max_align,
        sh_entsize: 0,
    }
}
