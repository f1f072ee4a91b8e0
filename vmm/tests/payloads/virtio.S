/* Probes the first two virtio-mmio windows: magic, version, device id, and the low word of
 * a block device's capacity (config space at 0x100), then prints its command line. */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    mov 0x18(%ebx), %edi           /* cmdline_paddr, printed last */
    mov $0xd0000000, %ebx
    mov $2, %ecx
1:  PRINT(m_dev)
    mov (%ebx), %eax
    call print_hex
    mov $' ', %al
    call putc
    mov 4(%ebx), %eax
    call print_hex
    mov $' ', %al
    call putc
    mov 8(%ebx), %eax
    call print_hex
    mov $' ', %al
    call putc
    mov 0x100(%ebx), %eax
    call print_hex
    add $0x1000, %ebx
    loop 1b
    PRINT(m_cmd)
    mov %edi, %esi
    call print
    mov $'\n', %al
    call putc
    mov $0, %al
    jmp exit_with
    .section .rodata
m_dev: .asciz "\ndev="
m_cmd: .asciz "\ncmdline="
