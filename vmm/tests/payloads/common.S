/* Shared pieces of the test payloads: the PVH note, a stack, COM1 printing and the two
 * kestrel platform ports. 32-bit protected mode, paging off, as PVH enters. */
#define COM1 0x3f8
#define BOOT_TIMER 0x440
#define EXIT_PORT 0x444

    .section .note.Xen, "a", @note
    .p2align 2
    .long 4            /* name size */
    .long 4            /* desc size */
    .long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start

    .text
    .code32

/* print: esi = NUL-terminated string */
print:
    push %eax
    push %edx
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, (%dx)
    jmp 1b
2:  pop %edx
    pop %eax
    ret

/* print_hex: eax = value, printed as 8 hex digits */
print_hex:
    push %eax
    push %ebx
    push %ecx
    push %edx
    mov %eax, %ebx
    mov $8, %ecx
    mov $COM1, %dx
1:  rol $4, %ebx
    mov %bl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 2f
    add $('a' - '9' - 1), %al
2:  out %al, (%dx)
    loop 1b
    pop %edx
    pop %ecx
    pop %ebx
    pop %eax
    ret

/* putc: al = character */
putc:
    push %edx
    mov $COM1, %dx
    out %al, (%dx)
    pop %edx
    ret

/* exit_with: al = status; never returns */
exit_with:
    mov $EXIT_PORT, %dx
    out %al, (%dx)
3:  cli
    hlt
    jmp 3b

#define PRINT(label) lea label, %esi; call print
