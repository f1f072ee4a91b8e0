/* Prints what PVH hands the guest: start-info magic, command line, memory map, modules. */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    mov %ebx, %edi                 /* hvm_start_info */
    PRINT(m_magic)
    mov (%edi), %eax
    call print_hex
    PRINT(m_cmdline)
    mov 0x18(%edi), %esi           /* cmdline_paddr */
    call print
    PRINT(m_memmap)
    mov 0x30(%edi), %ecx           /* memmap_entries */
    mov %ecx, %eax
    call print_hex
    mov 0x28(%edi), %ebx           /* memmap_paddr */
1:  test %ecx, %ecx
    jz 2f
    PRINT(m_entry)
    mov 4(%ebx), %eax
    call print_hex
    mov (%ebx), %eax
    call print_hex
    mov $' ', %al
    call putc
    mov 12(%ebx), %eax
    call print_hex
    mov 8(%ebx), %eax
    call print_hex
    mov $' ', %al
    call putc
    mov 16(%ebx), %eax
    call print_hex
    add $24, %ebx
    dec %ecx
    jmp 1b
2:  PRINT(m_modules)
    mov 0x0c(%edi), %eax           /* nr_modules */
    call print_hex
    test %eax, %eax
    jz 3f
    mov 0x10(%edi), %ebx           /* modlist_paddr */
    mov $' ', %al
    call putc
    mov (%ebx), %eax
    call print_hex
    mov $' ', %al
    call putc
    mov 8(%ebx), %eax
    call print_hex
    /* First four bytes of the module, as the guest reads them. */
    mov $' ', %al
    call putc
    mov (%ebx), %esi
    mov (%esi), %eax
    call print_hex
3:  PRINT(m_mptable)
    mov 0x9fc00, %eax              /* "_MP_" at the EBDA */
    call print_hex
    PRINT(m_end)
    mov $0, %al
    jmp exit_with
    .section .rodata
m_magic: .asciz "magic="
m_cmdline: .asciz "\ncmdline="
m_memmap: .asciz "\nmemmap="
m_entry: .asciz "\nentry="
m_modules: .asciz "\nmodules="
m_mptable: .asciz "\nmptable="
m_end: .asciz "\nend\n"
