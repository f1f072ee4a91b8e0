/* Prints what CPUID says to the guest: leaf 1 ECX/EDX/EBX, leaf 7 EBX/ECX, leaf 0xd EAX. */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    PRINT(m_l1)
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    mov %ecx, %eax
    call print_hex
    mov $' ', %al
    call putc
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, %eax
    call print_hex
    PRINT(m_l7)
    mov $7, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, %eax
    call print_hex
    mov $' ', %al
    call putc
    mov $7, %eax
    xor %ecx, %ecx
    cpuid
    mov %ecx, %eax
    call print_hex
    PRINT(m_ld)
    mov $0xd, %eax
    xor %ecx, %ecx
    cpuid
    call print_hex
    mov $'\n', %al
    call putc
    mov $0, %al
    jmp exit_with
    .section .rodata
m_l1: .asciz "leaf1="
m_l7: .asciz "\nleaf7="
m_ld: .asciz "\nleafd="
