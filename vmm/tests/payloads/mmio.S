/* Reads and writes MMIO where no device lives: reads must return all-ones, writes must be
 * ignored, and the VM must keep running. */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    movl $0x12345678, 0xd0000000
    mov 0xd0000000, %eax
    PRINT(m_read)
    call print_hex
    mov $'\n', %al
    call putc
    mov $0, %al
    jmp exit_with
    .section .rodata
m_read: .asciz "mmio="
