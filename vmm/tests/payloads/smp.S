/* Starts every application processor with INIT-SIPI-SIPI; each AP increments a counter in
 * real mode. Prints cpus=<BSP + APs seen> once the count equals the number on the command
 * line (or after a bounded wait). */
#include "common.S"
#define COUNTER 0x8800
#define TRAMPOLINE 0x8000
#define ICR_LOW 0xfee00300
#define ICR_HIGH 0xfee00310
    .globl _start
_start:
    mov $0x80000, %esp
    /* Expected CPU count: the decimal number the command line starts with. */
    mov 0x18(%ebx), %esi
    xor %ecx, %ecx
1:  movzbl (%esi), %eax
    sub $'0', %eax
    cmp $9, %eax
    ja 2f
    imul $10, %ecx
    add %eax, %ecx
    inc %esi
    jmp 1b
2:  mov %ecx, %edi
    movl $0, COUNTER
    /* Copy the real-mode trampoline below 1 MiB. */
    lea ap_start, %esi
    mov $TRAMPOLINE, %edx
    mov $(ap_end - ap_start), %ecx
3:  movb (%esi), %al
    movb %al, (%edx)
    inc %esi
    inc %edx
    loop 3b
    movl $0, ICR_HIGH
    movl $0x000c4500, ICR_LOW      /* INIT, all excluding self */
    movl $0x000c4608, ICR_LOW      /* SIPI, vector 0x08 -> 0x8000 */
    movl $0x000c4608, ICR_LOW      /* SIPI again, as the MP spec asks */
    mov $2000000, %ecx
4:  mov COUNTER, %eax
    inc %eax
    cmp %edi, %eax
    jae 5f
    pause
    loop 4b
5:  PRINT(m_cpus)
    mov COUNTER, %eax
    inc %eax
    call print_hex
    mov $'\n', %al
    call putc
    mov $0, %al
    jmp exit_with

    .code16
ap_start:
    lock incl COUNTER
6:  cli
    hlt
    jmp 6b
ap_end:
    .code32

    .section .rodata
m_cpus: .asciz "cpus="
