/* 64-bit Linux boot protocol entry: rsi = zero page. Prints what the zero page says. */
#define COM1 0x3f8
    .code64
entry64:
    mov $0x80000, %rsp
    mov %rsi, %rdi
    lea m_flag(%rip), %rsi
    call print64
    movzwl 0x1fe(%rdi), %eax       /* boot_flag */
    call hex64
    lea m_hdr(%rip), %rsi
    call print64
    mov 0x202(%rdi), %eax          /* "HdrS" */
    call hex64
    lea m_e820(%rip), %rsi
    call print64
    movzbl 0x1e8(%rdi), %eax       /* e820_entries */
    call hex64
    lea m_rd(%rip), %rsi
    call print64
    mov 0x21c(%rdi), %eax          /* ramdisk_size */
    call hex64
    lea m_cmd(%rip), %rsi
    call print64
    mov 0x228(%rdi), %esi          /* cmd_line_ptr */
    call print64
    lea m_nl(%rip), %rsi
    call print64
    mov $0x444, %dx
    mov $7, %al
    out %al, (%dx)
1:  hlt
    jmp 1b
print64:
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, (%dx)
    jmp 1b
2:  ret
hex64:
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
    ret
m_flag: .asciz "boot_flag="
m_hdr: .asciz " header="
m_e820: .asciz " e820="
m_rd: .asciz " ramdisk_size="
m_cmd: .asciz " cmdline="
m_nl: .asciz "\n"
