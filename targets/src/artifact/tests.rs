//! Tests of the artifact writer: this module owns the hand-assembled x86-64 and aarch64 specs,
//! loads their shared objects for real (dlopen on an x86-64 host, qemu-aarch64 for aarch64),
//! checks the ELF structure with `object::read`, and covers every error the writer reports.

use std::path::Path;
use std::process::Command;

use object::elf;
use object::read::elf::{
    ElfFile64, FileHeader as _, ProgramHeader as _, SectionHeader as _, VersionTable,
};
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

use super::reloc::{apply, OutOfRange};
use super::*;

const TABLE: [u32; 4] = [7, 0xC0FF_EE42, 3, 4];
const INSTALL_HINT: &str =
    "apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user";

fn function(name: &str, code: Vec<u8>, align: u64, relocs: Vec<Reloc>) -> FunctionBlob {
    FunctionBlob {
        name: name.to_string(),
        code,
        align,
        relocs,
    }
}

fn reloc(offset: u32, kind: RelocKind, target: &str, addend: i64) -> Reloc {
    Reloc {
        offset,
        kind,
        target: target.to_string(),
        addend,
    }
}

fn data(name: &str, bytes: Vec<u8>, align: u64) -> DataBlob {
    DataBlob {
        name: name.to_string(),
        bytes,
        align,
    }
}

fn table_bytes() -> Vec<u8> {
    TABLE.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn a64(instructions: &[u32]) -> Vec<u8> {
    instructions.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// `answer`, `call_answer`, `read_table` (exported), `hidden_seven` (not), a string and a table.
fn x86_spec() -> ArtifactSpec {
    let answer = vec![0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3]; // mov eax, 42; ret
    let call_answer = vec![
        0x48, 0x83, 0xec, 0x08, // sub rsp, 8
        0xe8, 0, 0, 0, 0, // call rel32 answer
        0x83, 0xc0, 0x01, // add eax, 1
        0x48, 0x83, 0xc4, 0x08, // add rsp, 8
        0xc3, // ret
    ];
    let read_table = vec![
        0x48, 0x8d, 0x05, 0, 0, 0, 0, // lea rax, [rip + rel32 table]
        0x8b, 0x40, 0x04, // mov eax, [rax + 4]
        0xc3, // ret
    ];
    let hidden_seven = vec![0xb8, 0x07, 0x00, 0x00, 0x00, 0xc3]; // mov eax, 7; ret
    ArtifactSpec {
        arch: Arch::X86_64,
        soname: "libkiln_x86_test.so".to_string(),
        functions: vec![
            function("answer", answer, 16, vec![]),
            function(
                "call_answer",
                call_answer,
                16,
                vec![reloc(5, RelocKind::X86PcRel4, "answer", -4)],
            ),
            function("hidden_seven", hidden_seven, 16, vec![]),
            function(
                "read_table",
                read_table,
                32,
                vec![reloc(3, RelocKind::X86PcRel4, "table", -4)],
            ),
        ],
        rodata: vec![
            data("message", b"kiln\0".to_vec(), 1),
            data("table", table_bytes(), 64),
        ],
        exports: names(&["answer", "call_answer", "read_table"]),
    }
}

/// The aarch64 counterpart of [`x86_spec`], with `bl` and `adrp`/`add` relocations.
fn aarch64_spec() -> ArtifactSpec {
    let answer = a64(&[0x5280_0540, 0xd65f_03c0]); // movz w0, #42; ret
    let call_answer = a64(&[
        0xa9bf_7bfd, // stp x29, x30, [sp, #-16]!
        0x9400_0000, // bl answer
        0x1100_0400, // add w0, w0, #1
        0xa8c1_7bfd, // ldp x29, x30, [sp], #16
        0xd65f_03c0, // ret
    ]);
    let read_table = a64(&[
        0x9000_0000, // adrp x0, table
        0x9100_0000, // add x0, x0, :lo12:table
        0xb940_0400, // ldr w0, [x0, #4]
        0xd65f_03c0, // ret
    ]);
    let hidden_seven = a64(&[0x5280_00e0, 0xd65f_03c0]); // movz w0, #7; ret
    ArtifactSpec {
        arch: Arch::Aarch64,
        soname: "libkiln_a64_test.so".to_string(),
        functions: vec![
            function("answer", answer, 16, vec![]),
            function("hidden_seven", hidden_seven, 16, vec![]),
            function(
                "call_answer",
                call_answer,
                16,
                vec![reloc(4, RelocKind::Aarch64Call26, "answer", 0)],
            ),
            function(
                "read_table",
                read_table,
                16,
                vec![
                    reloc(0, RelocKind::Aarch64AdrPrelPgHi21, "table", 0),
                    reloc(4, RelocKind::Aarch64AddAbsLo12Nc, "table", 0),
                ],
            ),
        ],
        // A large first blob so that `table` lands on another 4 KiB page than `read_table`'s
        // page offset would suggest, which makes the adrp page delta non-trivial.
        rodata: vec![
            data("padding", vec![0x5a; 5000], 64),
            data("table", table_bytes(), 64),
        ],
        exports: names(&["answer", "call_answer", "read_table"]),
    }
}

fn parse(bytes: &[u8]) -> ElfFile64<'_, Endianness> {
    ElfFile64::parse(bytes).expect("the artifact parses as ELF64")
}

/// Address of a .symtab symbol.
fn symbol_address(file: &ElfFile64<'_, Endianness>, name: &str) -> u64 {
    file.symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} is in .symtab"))
        .address()
}

/// The 32-bit word at `address` inside `.text`.
fn text_word(file: &ElfFile64<'_, Endianness>, address: u64) -> u32 {
    let text = file.section_by_name(".text").expect(".text exists");
    let at = (address - text.address()) as usize;
    let bytes = text.data().unwrap();
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn sign_extend(value: u32, bits: u32) -> i64 {
    let shift = 64 - bits;
    (i64::from(value) << shift) >> shift
}

fn dynamic_entries(file: &ElfFile64<'_, Endianness>, bytes: &[u8]) -> Vec<(i64, u64)> {
    let endian = file.endian();
    let segment = file
        .elf_program_headers()
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_DYNAMIC)
        .expect("PT_DYNAMIC exists");
    let entries = segment.dynamic(endian, bytes).unwrap().unwrap();
    entries
        .iter()
        .map(|d| (d.d_tag.get(endian), d.d_val.get(endian)))
        .collect()
}

fn dynstr_at(file: &ElfFile64<'_, Endianness>, offset: u64) -> String {
    let dynstr = file.section_by_name(".dynstr").unwrap().data().unwrap();
    let tail = &dynstr[offset as usize..];
    let end = tail.iter().position(|&b| b == 0).unwrap();
    String::from_utf8(tail[..end].to_vec()).unwrap()
}

/// Everything an Android or glibc loader relies on, checked on the bytes alone.
fn check_structure(spec: &ArtifactSpec, bytes: &[u8]) {
    let file = parse(bytes);
    let endian = file.endian();
    let header = file.elf_header();
    assert_eq!(header.e_type(endian), elf::ET_DYN);
    let machine = match spec.arch {
        Arch::X86_64 => elf::EM_X86_64,
        Arch::Aarch64 => elf::EM_AARCH64,
    };
    assert_eq!(header.e_machine(endian), machine);
    check_segments(&file, bytes.len() as u64);
    check_dynamic(spec, &file, bytes);
    check_dynamic_symbols(spec, &file);
    check_hash_lookups(spec, &file, bytes);
    check_local_symbols(spec, &file);
}

/// Both hash tables find every export and nothing else, as a loader's lookup would.
fn check_hash_lookups(spec: &ArtifactSpec, file: &ElfFile64<'_, Endianness>, bytes: &[u8]) {
    let endian = file.endian();
    let sections = file.elf_section_table();
    let symbols = file.elf_dynamic_symbol_table();
    let versions = VersionTable::default();
    let (sysv, _) = sections.hash(endian, bytes).unwrap().expect(".hash exists");
    let (gnu, _) = sections
        .gnu_hash(endian, bytes)
        .unwrap()
        .expect(".gnu.hash exists");
    let names = spec
        .functions
        .iter()
        .map(|f| &f.name)
        .chain(spec.rodata.iter().map(|d| &d.name));
    for name in names {
        let exported = spec.exports.contains(name);
        let bytes = name.as_bytes();
        let by_sysv = sysv.find(endian, bytes, elf::hash(bytes), None, symbols, &versions);
        let by_gnu = gnu.find(
            endian,
            bytes,
            elf::gnu_hash(bytes),
            None,
            symbols,
            &versions,
        );
        assert_eq!(by_sysv.is_some(), exported, ".hash lookup of {name}");
        assert_eq!(by_gnu.is_some(), exported, ".gnu.hash lookup of {name}");
    }
}

fn check_segments(file: &ElfFile64<'_, Endianness>, file_len: u64) {
    let endian = file.endian();
    let headers = file.elf_program_headers();
    let loads: Vec<_> = headers
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .collect();
    assert!(
        loads.len() >= 2,
        "at least the header and .dynamic segments"
    );
    let mut previous_end_page: Option<u64> = None;
    for p in &loads {
        let (offset, vaddr, align) = (p.p_offset(endian), p.p_vaddr(endian), p.p_align(endian));
        let (filesz, memsz) = (p.p_filesz(endian), p.p_memsz(endian));
        assert!(
            align >= 0x4000 && align.is_power_of_two(),
            "p_align {align:#x}"
        );
        assert_eq!(
            vaddr % align,
            offset % align,
            "p_vaddr ≡ p_offset mod p_align"
        );
        assert!(offset + filesz <= file_len);
        assert!(filesz > 0 && memsz == filesz);
        let first_page = vaddr / align;
        if let Some(end_page) = previous_end_page {
            assert!(first_page > end_page, "segments share a page");
        }
        previous_end_page = Some((vaddr + memsz - 1) / align);
    }
    assert_eq!(
        loads[0].p_offset(endian),
        0,
        "the first PT_LOAD maps the ELF and program headers"
    );
    let stack = headers
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_GNU_STACK)
        .expect("PT_GNU_STACK exists");
    assert_eq!(
        stack.p_flags(endian) & elf::PF_X,
        0,
        "the stack is not executable"
    );
    let dynamic = headers
        .iter()
        .find(|p| p.p_type(endian) == elf::PT_DYNAMIC)
        .unwrap();
    let dynamic_section = file.section_by_name(".dynamic").unwrap();
    // Bionic refuses a .dynamic section header that disagrees with PT_DYNAMIC.
    assert_eq!(
        Some((dynamic.p_offset(endian), dynamic.p_filesz(endian))),
        dynamic_section.file_range()
    );
    for section in file.elf_section_table().iter() {
        let kind = section.sh_type(endian);
        assert!(
            ![elf::SHT_REL, elf::SHT_RELA, elf::SHT_RELR].contains(&kind),
            "no relocation sections"
        );
        if kind == elf::SHT_DYNAMIC {
            let link = file
                .elf_section_table()
                .section(object::SectionIndex(section.sh_link(endian) as usize));
            assert_eq!(
                link.unwrap().sh_type(endian),
                elf::SHT_STRTAB,
                ".dynamic links .dynstr"
            );
        }
    }
}

fn check_dynamic(spec: &ArtifactSpec, file: &ElfFile64<'_, Endianness>, bytes: &[u8]) {
    let entries = dynamic_entries(file, bytes);
    let forbidden = [
        elf::DT_NEEDED,
        elf::DT_REL,
        elf::DT_RELA,
        elf::DT_JMPREL,
        elf::DT_RELR,
        elf::DT_TEXTREL,
        elf::DT_PLTGOT,
    ];
    for (tag, _) in &entries {
        assert!(!forbidden.contains(tag), "forbidden tag {tag:#x}");
    }
    let value = |tag: i64| entries.iter().find(|(t, _)| *t == tag).map(|&(_, v)| v);
    let soname = value(elf::DT_SONAME).expect("DT_SONAME");
    assert_eq!(dynstr_at(file, soname), spec.soname);
    for tag in [
        elf::DT_HASH,
        elf::DT_GNU_HASH,
        elf::DT_STRTAB,
        elf::DT_SYMTAB,
        elf::DT_STRSZ,
    ] {
        assert!(
            value(tag).is_some_and(|v| v != 0),
            "tag {tag:#x} present and non-zero"
        );
    }
    assert_eq!(value(elf::DT_SYMENT), Some(24));
    assert_eq!(entries.last(), Some(&(elf::DT_NULL, 0)));
}

fn check_dynamic_symbols(spec: &ArtifactSpec, file: &ElfFile64<'_, Endianness>) {
    let text_index = file.section_by_name(".text").unwrap().index();
    let mut exported: Vec<String> = Vec::new();
    for symbol in file.dynamic_symbols() {
        let name = symbol.name().unwrap().to_string();
        let function = spec.functions.iter().find(|f| f.name == name).unwrap();
        assert!(
            symbol.is_global() && symbol.is_definition(),
            "{name} is a global definition"
        );
        assert_eq!(symbol.kind(), SymbolKind::Text);
        assert_eq!(symbol.section_index(), Some(text_index));
        assert_eq!(symbol.size(), function.code.len() as u64);
        assert_eq!(symbol.address(), symbol_address(file, &name));
        exported.push(name);
    }
    exported.sort();
    let mut expected = spec.exports.clone();
    expected.sort();
    assert_eq!(
        exported, expected,
        "exactly the exports are dynamic symbols"
    );
}

fn check_local_symbols(spec: &ArtifactSpec, file: &ElfFile64<'_, Endianness>) {
    let blobs = spec
        .functions
        .iter()
        .map(|f| (&f.name, f.align, SymbolKind::Text));
    let data = spec
        .rodata
        .iter()
        .map(|d| (&d.name, d.align, SymbolKind::Data));
    for (name, align, kind) in blobs.chain(data) {
        let symbol = file
            .symbols()
            .find(|s| s.name() == Ok(name.as_str()))
            .unwrap();
        assert!(symbol.is_local(), "{name} is local in .symtab");
        assert_eq!(symbol.kind(), kind);
        assert_eq!(symbol.address() % align, 0, "{name} is aligned to {align}");
    }
    let rodata = file.section_by_name(".rodata").unwrap();
    assert_eq!(rodata.kind(), SectionKind::ReadOnlyData);
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn x86_64_library_loads_and_runs() {
    let bytes = write_shared_object(&x86_spec()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libkiln_x86_test.so");
    std::fs::write(&path, &bytes).unwrap();
    // SAFETY: the library runs no initialisers and the three functions match these signatures.
    unsafe {
        let library = libloading::Library::new(&path).unwrap();
        let answer = library.get::<extern "C" fn() -> i32>("answer").unwrap();
        let call_answer = library
            .get::<extern "C" fn() -> i32>("call_answer")
            .unwrap();
        let read_table = library.get::<extern "C" fn() -> u32>("read_table").unwrap();
        assert_eq!(answer(), 42);
        assert_eq!(call_answer(), 43);
        assert_eq!(read_table(), TABLE[1]);
        assert!(library
            .get::<extern "C" fn() -> i32>("hidden_seven")
            .is_err());
        assert!(library.get::<extern "C" fn() -> i32>("table").is_err());
    }
}

#[test]
fn artifact_structure_has_no_imports_and_only_the_exports() {
    for spec in [x86_spec(), aarch64_spec()] {
        let bytes = write_shared_object(&spec).unwrap();
        check_structure(&spec, &bytes);
    }
}

#[test]
fn artifact_without_rodata_or_exports_is_still_well_formed() {
    let mut spec = x86_spec();
    spec.functions.retain(|f| f.relocs.is_empty());
    spec.rodata.clear();
    spec.exports.clear();
    let bytes = write_shared_object(&spec).unwrap();
    check_structure(&spec, &bytes);
    let file = parse(&bytes);
    let loads = file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(file.endian()) == elf::PT_LOAD)
        .count();
    assert_eq!(loads, 3, "headers, .text and .dynamic");
}

#[test]
fn artifact_hash_tables_serve_many_exports() {
    let mut spec = x86_spec();
    for i in 0..40 {
        let name = format!("kiln_export_{i}");
        spec.functions.push(function(&name, vec![0xc3], 4, vec![]));
        spec.exports.push(name);
    }
    let bytes = write_shared_object(&spec).unwrap();
    check_structure(&spec, &bytes);
    if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libkiln_many.so");
        std::fs::write(&path, &bytes).unwrap();
        // SAFETY: the library runs no initialisers; symbols are only looked up, never called.
        unsafe {
            let library = libloading::Library::new(&path).unwrap();
            for name in &spec.exports {
                assert!(
                    library.get::<extern "C" fn()>(name.as_str()).is_ok(),
                    "dlsym {name}"
                );
            }
            assert!(library.get::<extern "C" fn()>("hidden_seven").is_err());
        }
    }
}

#[test]
fn artifact_is_small_and_deterministic() {
    for spec in [x86_spec(), aarch64_spec()] {
        let first = write_shared_object(&spec).unwrap();
        let second = write_shared_object(&spec.clone()).unwrap();
        assert_eq!(first, second);
        let payload: usize = spec.rodata.iter().map(|d| d.bytes.len()).sum();
        assert!(
            first.len() < payload + 4096,
            "no page padding: {} bytes",
            first.len()
        );
    }
}

#[test]
fn artifact_aarch64_relocations_patch_the_instruction_fields() {
    let bytes = write_shared_object(&aarch64_spec()).unwrap();
    let file = parse(&bytes);
    let answer = symbol_address(&file, "answer");
    let call_answer = symbol_address(&file, "call_answer");
    let read_table = symbol_address(&file, "read_table");
    let table = symbol_address(&file, "table");

    let bl = text_word(&file, call_answer + 4);
    assert_eq!(bl & 0xfc00_0000, 0x9400_0000, "still a bl");
    let bl_delta = sign_extend(bl & 0x03ff_ffff, 26) * 4;
    assert_eq!(bl_delta, answer as i64 - (call_answer + 4) as i64);

    let adrp = text_word(&file, read_table);
    assert_eq!(adrp & 0x9f00_001f, 0x9000_0000, "still adrp x0");
    let immlo = (adrp >> 29) & 0x3;
    let immhi = (adrp >> 5) & 0x7_ffff;
    let pages = sign_extend((immhi << 2) | immlo, 21);
    let expected_pages = ((table & !0xfff) as i64 - (read_table & !0xfff) as i64) >> 12;
    assert_eq!(pages, expected_pages);
    assert_ne!(pages, 0, "the table lies on another page");

    let add = text_word(&file, read_table + 4);
    assert_eq!(add & !(0xfff << 10), 0x9100_0000, "still add x0, x0, #imm");
    assert_eq!(u64::from((add >> 10) & 0xfff), table & 0xfff);
}

fn tool_works(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

const AARCH64_DLOPEN_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
typedef int (*fn_i32)(void);
typedef unsigned (*fn_u32)(void);
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 3; }
    fn_i32 answer = (fn_i32)dlsym(lib, "answer");
    fn_i32 call_answer = (fn_i32)dlsym(lib, "call_answer");
    fn_u32 read_table = (fn_u32)dlsym(lib, "read_table");
    if (!answer || !call_answer || !read_table) { fprintf(stderr, "dlsym failed\n"); return 4; }
    if (dlsym(lib, "hidden_seven") || dlsym(lib, "table")) { fprintf(stderr, "leak\n"); return 5; }
    printf("%d %d %u\n", answer(), call_answer(), read_table());
    return dlclose(lib) == 0 ? 0 : 6;
}
"#;

fn run_checked(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} did not start: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn artifact_aarch64_library_runs_under_qemu() {
    let missing: Vec<&str> = ["aarch64-linux-gnu-gcc", "qemu-aarch64"]
        .into_iter()
        .filter(|tool| !tool_works(tool))
        .collect();
    let sysroot = Path::new("/usr/aarch64-linux-gnu");
    assert!(
        missing.is_empty() && sysroot.join("lib").is_dir(),
        "this test dlopens the aarch64 artifact under qemu and needs {missing:?} and the \
         aarch64 glibc in {}; install them with `{INSTALL_HINT}`",
        sysroot.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("libkiln_a64_test.so");
    std::fs::write(&library, write_shared_object(&aarch64_spec()).unwrap()).unwrap();
    let source = dir.path().join("load.c");
    std::fs::write(&source, AARCH64_DLOPEN_C).unwrap();
    let program = dir.path().join("load");
    run_checked(
        Command::new("aarch64-linux-gnu-gcc")
            .arg("-O1")
            .arg("-o")
            .arg(&program)
            .arg(&source)
            .arg("-ldl"),
    );
    let stdout = run_checked(
        Command::new("qemu-aarch64")
            .arg("-L")
            .arg(sysroot)
            .arg(&program)
            .arg(&library),
    );
    assert_eq!(stdout.trim(), format!("42 43 {}", TABLE[1]));
}

#[test]
fn artifact_reloc_arithmetic_matches_the_definitions() {
    let mut code = vec![0u8; 4];
    // x86: S + A - P, backwards.
    apply(
        &reloc(0, RelocKind::X86PcRel4, "t", -4),
        &mut code,
        0x1000,
        0x2000,
    )
    .unwrap();
    assert_eq!(
        i32::from_le_bytes(code[..4].try_into().unwrap()),
        0x1000 - 4 - 0x2000
    );
    // bl backwards by 8 bytes keeps the opcode.
    let mut code = 0x9400_0000u32.to_le_bytes().to_vec();
    apply(
        &reloc(0, RelocKind::Aarch64Call26, "t", 0),
        &mut code,
        0x4000,
        0x4008,
    )
    .unwrap();
    assert_eq!(
        u32::from_le_bytes(code[..4].try_into().unwrap()),
        0x9400_0000 | 0x03ff_fffe
    );
    // adrp two pages back, with an addend carrying into the next page.
    let mut code = 0x9000_0001u32.to_le_bytes().to_vec();
    apply(
        &reloc(0, RelocKind::Aarch64AdrPrelPgHi21, "t", 0x10),
        &mut code,
        0x1ff8,
        0x3010,
    )
    .unwrap();
    let insn = u32::from_le_bytes(code[..4].try_into().unwrap());
    let pages = sign_extend((((insn >> 5) & 0x7_ffff) << 2) | ((insn >> 29) & 3), 21);
    assert_eq!((pages, insn & 0x9f00_001f), (-1, 0x9000_0001));
    // add :lo12: keeps registers and takes the low 12 bits of S + A.
    let mut code = 0x9100_0421u32.to_le_bytes().to_vec();
    apply(
        &reloc(0, RelocKind::Aarch64AddAbsLo12Nc, "t", 0x10),
        &mut code,
        0x12345,
        0,
    )
    .unwrap();
    assert_eq!(
        u32::from_le_bytes(code[..4].try_into().unwrap()),
        0x9100_0421 | (0x355 << 10)
    );
    // Out-of-range and misaligned values are refused.
    let mut code = vec![0u8; 4];
    let far = reloc(0, RelocKind::Aarch64Call26, "t", 1 << 27);
    assert_eq!(apply(&far, &mut code, 0, 0), Err(OutOfRange(1 << 27)));
    let odd = reloc(0, RelocKind::Aarch64Call26, "t", 2);
    assert_eq!(apply(&odd, &mut code, 0, 0), Err(OutOfRange(2)));
    let adrp_far = reloc(0, RelocKind::Aarch64AdrPrelPgHi21, "t", 1 << 32);
    assert_eq!(apply(&adrp_far, &mut code, 0, 0), Err(OutOfRange(1 << 32)));
}

#[test]
fn artifact_rejects_unknown_reloc_target() {
    let mut spec = x86_spec();
    spec.functions[1].relocs[0].target = "nowhere".to_string();
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::UnknownSymbol {
            function: "call_answer".to_string(),
            target: "nowhere".to_string()
        })
    );
}

#[test]
fn artifact_rejects_reloc_of_the_wrong_arch() {
    let mut spec = x86_spec();
    spec.functions[1].relocs[0].kind = RelocKind::Aarch64Call26;
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::WrongArch {
            kind: RelocKind::Aarch64Call26,
            arch: Arch::X86_64
        })
    );
    let mut spec = aarch64_spec();
    spec.functions[2].relocs[0].kind = RelocKind::X86PcRel4;
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::WrongArch {
            kind: RelocKind::X86PcRel4,
            arch: Arch::Aarch64
        })
    );
}

#[test]
fn artifact_rejects_out_of_range_relocs() {
    let mut spec = aarch64_spec();
    spec.functions[2].relocs[0].addend = 1 << 28;
    let error = write_shared_object(&spec).unwrap_err();
    assert!(
        matches!(
            &error,
            ArtifactError::OutOfRange { function, offset: 4, kind: RelocKind::Aarch64Call26, value }
                if function == "call_answer" && *value >= 1 << 27
        ),
        "{error:?}"
    );
    let mut spec = x86_spec();
    spec.functions[3].relocs[0].addend = 1 << 40;
    let error = write_shared_object(&spec).unwrap_err();
    assert!(
        matches!(
            &error,
            ArtifactError::OutOfRange {
                kind: RelocKind::X86PcRel4,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn artifact_rejects_reloc_outside_the_code() {
    let mut spec = x86_spec();
    spec.functions[1].relocs[0].offset = 14; // the field would end past the 17-byte function
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::RelocOutsideCode {
            function: "call_answer".to_string(),
            offset: 14,
            kind: RelocKind::X86PcRel4
        })
    );
}

#[test]
fn artifact_rejects_unknown_export() {
    let mut spec = x86_spec();
    spec.exports.push("kiln_run".to_string());
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::UnknownExport("kiln_run".to_string()))
    );
    // Data blobs are not functions, so they cannot be exported either.
    let mut spec = x86_spec();
    spec.exports.push("table".to_string());
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::UnknownExport("table".to_string()))
    );
}

#[test]
fn artifact_rejects_duplicate_symbols() {
    let mut spec = x86_spec();
    spec.rodata[0].name = "answer".to_string();
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::DuplicateSymbol("answer".to_string()))
    );
    let mut spec = x86_spec();
    spec.functions[2].name = "answer".to_string();
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::DuplicateSymbol("answer".to_string()))
    );
    let mut spec = x86_spec();
    spec.exports.push("answer".to_string());
    assert_eq!(
        write_shared_object(&spec),
        Err(ArtifactError::DuplicateSymbol("answer".to_string()))
    );
}

#[test]
fn artifact_rejects_bad_alignment_and_names() {
    let mut spec = x86_spec();
    spec.rodata[1].align = 48;
    assert!(matches!(
        write_shared_object(&spec),
        Err(ArtifactError::InvalidAlign { align: 48, .. })
    ));
    let mut spec = x86_spec();
    spec.soname = "lib\0kiln.so".to_string();
    assert!(matches!(
        write_shared_object(&spec),
        Err(ArtifactError::InvalidName(_))
    ));
    let mut spec = x86_spec();
    spec.functions[0].name.clear();
    assert!(matches!(
        write_shared_object(&spec),
        Err(ArtifactError::InvalidName(_))
    ));
}
